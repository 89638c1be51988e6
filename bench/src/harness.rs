//! `postcode-bench run`: every benchmark of issue #5 next to its reference, on
//! this machine, in one run, written as Markdown (BENCHMARKS.md).
//!
//! Each measured command runs as a child process; wall time is taken around
//! it and peak RSS is the kernel's `ru_maxrss` from `wait4`, which for a
//! process that ran children (`postcode-operator local`) is the largest of the
//! process and its descendants.

use std::{
    fmt::Write as _,
    fs::File,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{bail, Context, Result};
use pipeline::store::Store;

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// The shared data folder (postcodesgeo.csv, nspl-latlon.csv.gz).
    #[arg(long, default_value = "../shared/data")]
    data: PathBuf,
    /// Scratch folder for synthetic files and databases.
    #[arg(long, default_value = "/tmp/postcode-bench")]
    work: PathBuf,
    /// PostgreSQL to load into (a throwaway server: tables are created and dropped).
    #[arg(long, env = "BENCH_DATABASE_URL")]
    database_url: String,
    /// Python with numpy and scipy, for the reference script.
    #[arg(long, default_value = "python3")]
    python: PathBuf,
    /// Where the workspace's release binaries are.
    #[arg(long, default_value = "target/release")]
    bin_dir: PathBuf,
    /// Row counts of the load and memory runs (the first is the real file).
    #[arg(long, value_delimiter = ',', default_value = "100000,1000000,10000000")]
    sizes: Vec<u64>,
    /// Quotas (requests a second) of the API runs.
    #[arg(long, value_delimiter = ',', default_value = "20,50")]
    quotas: Vec<f64>,
    /// The Markdown report to write.
    #[arg(long, default_value = "BENCHMARKS.md")]
    out: PathBuf,
}

/// One measured child process.
#[derive(Debug, Clone, Default)]
struct Measured {
    seconds: f64,
    peak_rss_kib: u64,
    stdout: String,
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Runs `cmd` to completion with stdout captured to a file and stderr to `log`;
/// fails when it exits non-zero.
fn measure(cmd: &mut Command, log: &Path) -> Result<Measured> {
    let out_path = log.with_extension("stdout");
    cmd.stdin(Stdio::null())
        .stdout(File::create(&out_path)?)
        .stderr(File::create(log)?);
    let started = Instant::now();
    let child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
    let mut status = 0;
    // SAFETY: rusage is plain data; wait4 fills it for our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    let seconds = started.elapsed().as_secs_f64();
    if r < 0 {
        bail!("wait4: {}", std::io::Error::last_os_error());
    }
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
        let err = std::fs::read_to_string(log).unwrap_or_default();
        let tail: Vec<&str> = err.lines().rev().take(15).collect();
        bail!(
            "{cmd:?} failed (status {status}):\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    Ok(Measured {
        seconds,
        peak_rss_kib: usage.ru_maxrss as u64,
        stdout,
    })
}

fn command_output(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .map(|o| {
            String::from_utf8_lossy(if o.stdout.is_empty() { &o.stderr } else { &o.stdout })
                .trim()
                .to_string()
        })
        .unwrap_or_else(|| "not found".into())
}

fn size_name(n: u64) -> String {
    match n {
        n if n % 1_000_000 == 0 => format!("{}M", n / 1_000_000),
        n if n % 1_000 == 0 => format!("{}k", n / 1_000),
        n => n.to_string(),
    }
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "meets"
    } else {
        "**misses**"
    }
}

struct Ctx {
    args: RunArgs,
    rt: tokio::runtime::Runtime,
    work: PathBuf,
    real: PathBuf,
    nspl: PathBuf,
    bin: PathBuf,
    index_cache: PathBuf,
}

impl Ctx {
    /// A workspace binary, run as `local` runs its Jobs: as the user, reading
    /// local files, so without the cluster's egress policy (`EGRESS_POLICY=off`).
    fn bin(&self, name: &str) -> Command {
        let mut c = Command::new(self.bin.join(name));
        c.env(pipeline::egress::ENV_POLICY, "off");
        c
    }

    fn log(&self, name: &str) -> PathBuf {
        self.work.join("logs").join(format!("{name}.log"))
    }

    fn input(&self, rows: u64) -> Result<PathBuf> {
        let real_rows = BufReader::new(File::open(&self.real)?).lines().count() as u64 - 1;
        if rows == real_rows {
            return Ok(self.real.clone());
        }
        let path = self.work.join(format!("synthetic-{}.csv", size_name(rows)));
        crate::synth(&self.real, rows, &path, 20261129, crate::Shape::COPIES)?;
        Ok(path)
    }

    fn psql(&self, sql: &str) -> Result<()> {
        let out = Command::new("psql")
            .args([&self.args.database_url, "-v", "ON_ERROR_STOP=1", "-q", "-c", sql])
            .output()?;
        if !out.status.success() {
            bail!("psql {sql}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    fn sqlite_store(&self, path: &Path) -> Result<()> {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
        self.rt.block_on(async {
            let store = Store::connect(&path.display().to_string()).await?;
            store.migrate().await?;
            store.close().await;
            anyhow::Ok(())
        })
    }
}

pub fn run(args: RunArgs) -> Result<()> {
    let work = args.work.clone();
    std::fs::create_dir_all(work.join("logs"))?;
    // The cache `local` builds (its TMPDIR is work/tmp): enricher runs share it.
    let index_cache = work.join("tmp").join("postcode-operator-index");
    let ctx = Ctx {
        real: args.data.join("postcodesgeo.csv"),
        nspl: args.data.join("nspl-latlon.csv.gz"),
        bin: std::fs::canonicalize(&args.bin_dir).context("--bin-dir")?,
        rt: tokio::runtime::Runtime::new()?,
        work,
        index_cache,
        args,
    };
    for f in [&ctx.real, &ctx.nspl] {
        if !f.exists() {
            bail!("{} is missing (see --data)", f.display());
        }
    }
    let started = Instant::now();
    let mut md = String::new();
    writeln!(md, "# Benchmarks\n")?;
    writeln!(md, "Written by `make bench` (`bench/run.sh` → `postcode-bench run`); every figure in one run, next to its reference, on this machine.")?;
    writeln!(md, "Wall times are whole commands; peak RSS is the kernel's `ru_maxrss` of the process (for `local`, the largest of it and its Jobs).\n")?;
    machine(&ctx, &mut md)?;
    let (inputs, loads) = load_section(&ctx, &mut md)?;
    lookups_section(&ctx, &inputs, &mut md)?;
    let e2e = e2e_section(&ctx, &inputs, &mut md)?;
    memory_section(&ctx, &inputs, &loads, &e2e, &mut md)?;
    api_section(&ctx, &mut md)?;
    writeln!(
        md,
        "\nThe whole run took {:.0} s.",
        started.elapsed().as_secs_f64()
    )?;
    std::fs::write(&ctx.args.out, &md)?;
    eprintln!("wrote {}", ctx.args.out.display());
    Ok(())
}

fn machine(ctx: &Ctx, md: &mut String) -> Result<()> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("?")
        .trim()
        .to_string();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal"))
        .map(|l| {
            l.split_whitespace()
                .nth(1)
                .unwrap_or("0")
                .parse::<u64>()
                .unwrap_or(0)
        })
        .unwrap_or(0);
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    writeln!(md, "## Machine\n")?;
    writeln!(md, "| | |\n|---|---|")?;
    writeln!(md, "| CPU | {cpu}, {cores} cores |")?;
    writeln!(md, "| memory | {:.1} GiB |", mem as f64 / 1024.0 / 1024.0)?;
    writeln!(md, "| kernel | {} |", command_output("uname", &["-sr"]))?;
    writeln!(
        md,
        "| commit | {} |",
        command_output("git", &["rev-parse", "--short", "HEAD"])
    )?;
    writeln!(md, "| rustc | {} |", command_output("rustc", &["--version"]))?;
    writeln!(
        md,
        "| PostgreSQL | {} |",
        command_output(
            "psql",
            &["-At", &ctx.args.database_url, "-c", "SHOW server_version"]
        )
    )?;
    writeln!(
        md,
        "| sqlite3 | {} |",
        command_output("sqlite3", &["--version"])
            .split_whitespace()
            .next()
            .unwrap_or("?")
    )?;
    let py = ctx.args.python.display().to_string();
    writeln!(md, "| Python | {} |", command_output(&py, &["-c", "import sys, numpy, scipy; print(sys.version.split()[0], 'numpy', numpy.__version__, 'scipy', scipy.__version__)"]))?;
    writeln!(md, "| command | `make bench` |\n")?;
    Ok(())
}

struct Load {
    rows: u64,
    pg: Measured,
    pg_ref: Measured,
    sqlite: Measured,
    sqlite_ref: Measured,
    enricher: Measured,
}

/// The run of median time (the lower middle of an even count), with the
/// largest peak RSS of all. The median, not the best: at 0.1 s a run, the
/// fastest of a few catches one side's fast outliers (`sqlite3`'s fsyncs vary
/// by ±30%) and says little of what a user sees.
fn median(mut runs: Vec<Measured>) -> Measured {
    let peak = runs.iter().map(|m| m.peak_rss_kib).max().unwrap_or(0);
    runs.sort_by(|a, b| a.seconds.total_cmp(&b.seconds));
    let m = runs.swap_remove((runs.len() - 1) / 2);
    Measured {
        peak_rss_kib: peak,
        ..m
    }
}

/// The inputs of every size the run asks for, and the measured loads.
type LoadRuns = (Vec<(u64, PathBuf)>, Vec<Load>);

/// `reader-job` loading `file` as import `uid` into `database_url`.
fn reader_cmd(ctx: &Ctx, uid: &str, file: &str, database_url: &str) -> Command {
    let mut c = ctx.bin("reader-job");
    c.args([
        "--import-uid",
        uid,
        "--import-name",
        "bench",
        "--source",
        file,
        "--shards",
        "4",
        "--database-url",
        database_url,
    ]);
    c
}

/// One round of the four loads of `file`: the reader and `psql \copy` into
/// PostgreSQL, the reader and `sqlite3 .import` into SQLite (`db`).
fn load_round(ctx: &Ctx, name: &str, file_s: &str, uid: &str, db: &Path) -> Result<[Measured; 4]> {
    // PostgreSQL: psql \copy into a table keyed by row number, then the reader.
    ctx.psql("DROP TABLE IF EXISTS bench_ref; CREATE TABLE bench_ref (row_number bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, lat double precision, lon double precision)")?;
    // Each side starts with no dirty pages of the other's to write back.
    ctx.psql("CHECKPOINT")?;
    let pg_ref = measure(
        Command::new("psql").args([
            &ctx.args.database_url,
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            &format!("\\copy bench_ref (lat, lon) FROM '{file_s}' WITH (FORMAT csv, HEADER true)"),
        ]),
        &ctx.log(&format!("psql-copy-{name}")),
    )?;
    ctx.psql("DROP TABLE bench_ref")?;
    ctx.psql("CHECKPOINT")?;
    let pg = measure(
        &mut reader_cmd(ctx, uid, file_s, &ctx.args.database_url),
        &ctx.log(&format!("reader-pg-{name}")),
    )?;
    ctx.rt.block_on(async {
        let store = Store::connect(&ctx.args.database_url).await?;
        store.delete_import(uid).await?;
        store.close().await;
        anyhow::Ok(())
    })?;
    ctx.psql("VACUUM")?;
    // SQLite: sqlite3 .import into a rowid table, then the reader.
    let ref_db = ctx.work.join("bench-ref.db");
    let _ = std::fs::remove_file(&ref_db);
    let sqlite_ref = measure(
        Command::new("sqlite3").arg(&ref_db).args([
            "CREATE TABLE bench_ref (lat DOUBLE PRECISION, lon DOUBLE PRECISION)",
            &format!(".import --csv --skip 1 {file_s} bench_ref"),
        ]),
        &ctx.log(&format!("sqlite3-import-{name}")),
    )?;
    let _ = std::fs::remove_file(&ref_db);
    ctx.sqlite_store(db)?;
    let sqlite = measure(
        &mut reader_cmd(ctx, uid, file_s, &db.display().to_string()),
        &ctx.log(&format!("reader-sqlite-{name}")),
    )?;
    Ok([pg, pg_ref, sqlite, sqlite_ref])
}

/// Loads `file` (`n` rows) the median of several rounds, then one enricher on it.
fn measure_load(ctx: &Ctx, n: u64, file: &Path) -> Result<Load> {
    let name = size_name(n);
    eprintln!("load {name}");
    let file_s = file.display().to_string();
    let db = ctx.work.join("bench-load.db");
    let uid = format!("bench-load-{name}");
    // Median of ten runs at 100k rows, of three at 1M, one run at 10M (each side alike).
    let reps = match n {
        10_000_000.. => 1,
        1_000_000.. => 3,
        _ => 10,
    };
    let mut runs: [Vec<Measured>; 4] = Default::default();
    for _ in 0..reps {
        for (all, m) in runs.iter_mut().zip(load_round(ctx, &name, &file_s, &uid, &db)?) {
            all.push(m);
        }
    }
    let [pg, pg_ref, sqlite, sqlite_ref] = runs.map(median);
    // One enricher (shard 0 of 4) on what the reader loaded, for its memory.
    let enricher = measure(
        ctx.bin("enricher-job")
            .args(["--import-uid", &uid, "--shard", "0", "--database-url"])
            .arg(&db)
            .arg("--offline-postcodes")
            .arg(&ctx.nspl)
            .arg("--index-cache-dir")
            .arg(&ctx.index_cache),
        &ctx.log(&format!("enricher-sqlite-{name}")),
    )?;
    ctx.sqlite_store(&db)?;
    Ok(Load {
        rows: n,
        pg,
        pg_ref,
        sqlite,
        sqlite_ref,
        enricher,
    })
}

fn load_section(ctx: &Ctx, md: &mut String) -> Result<LoadRuns> {
    let mut inputs = Vec::new();
    for &n in &ctx.args.sizes {
        inputs.push((n, ctx.input(n)?));
    }
    ctx.rt.block_on(async {
        let store = Store::connect(&ctx.args.database_url).await?;
        store.migrate().await?;
        store.close().await;
        anyhow::Ok(())
    })?;
    // The harness itself stays small: a child's ru_maxrss starts from its parent's
    // resident size at exec, so the postcode index is never loaded in this process.
    std::fs::create_dir_all(&ctx.index_cache)?;
    let mut loads = Vec::new();
    for (n, file) in &inputs {
        loads.push(measure_load(ctx, *n, file)?);
    }
    write_load_table(md, &loads)?;
    Ok((inputs, loads))
}

fn write_load_table(md: &mut String, loads: &[Load]) -> Result<()> {
    writeln!(md, "## 1. Load\n")?;
    writeln!(md, "`reader-job` (detect the layout, validate every row, store it with its line, fields, shard and status; the shards' lookups are planned later by the enrichers) against the database's own bulk loader putting the same file into a table keyed by row number: `psql \\copy` and `sqlite3 .import`.")?;
    writeln!(md, "Inputs: the real file (100k rows), and synthetic files made from it by `postcode-bench synth` (copies after the first moved by up to ±0.001°). Median of ten runs each at 100k rows, of three at 1M, one run at 10M; each time includes process start.\n")?;
    writeln!(md, "| rows | reader → PostgreSQL | `psql \\copy` | ratio (target ≤ 1.3) | reader → SQLite | `sqlite3 .import` | ratio (target ≤ 1.5) |")?;
    writeln!(md, "|---:|---:|---:|---:|---:|---:|---:|")?;
    for l in loads {
        let (rp, rs) = (
            l.pg.seconds / l.pg_ref.seconds,
            l.sqlite.seconds / l.sqlite_ref.seconds,
        );
        writeln!(
            md,
            "| {} | {:.2} s ({:.0} rows/s) | {:.2} s | {:.2} {} | {:.2} s ({:.0} rows/s) | {:.2} s | {:.2} {} |",
            size_name(l.rows),
            l.pg.seconds,
            l.rows as f64 / l.pg.seconds,
            l.pg_ref.seconds,
            rp,
            verdict(rp <= 1.3),
            l.sqlite.seconds,
            l.rows as f64 / l.sqlite.seconds,
            l.sqlite_ref.seconds,
            rs,
            verdict(rs <= 1.5)
        )?;
    }
    writeln!(md)?;
    Ok(())
}

fn lookups_section(ctx: &Ctx, inputs: &[(u64, PathBuf)], md: &mut String) -> Result<()> {
    eprintln!("lookups");
    let queries = inputs
        .iter()
        .find(|(n, _)| *n == 1_000_000)
        .or(inputs.last())
        .map(|(_, p)| p.clone())
        .context("no input")?;
    let ours = measure(
        ctx.bin("postcode-bench")
            .args(["lookups", "--postcodes"])
            .arg(&ctx.nspl)
            .arg("--queries")
            .arg(&queries),
        &ctx.log("lookups-rust"),
    )?;
    let theirs = measure(
        Command::new(&ctx.args.python)
            .arg("bench/reference.py")
            .arg("lookups")
            .arg(&ctx.nspl)
            .arg(&queries),
        &ctx.log("lookups-python"),
    )?;
    let o: serde_json::Value = serde_json::from_str(ours.stdout.trim())?;
    let t: serde_json::Value = serde_json::from_str(theirs.stdout.trim())?;
    let f = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    writeln!(md, "## 2. Offline lookups\n")?;
    writeln!(
        md,
        "The {:.0} postcodes of `nspl-latlon.csv.gz` ({:.0} distinct centroids in our index); {:.0} queries (the 1M input's coordinates, in file order), one thread. Both index unit vectors on the sphere; ours then ranks the candidates by geodesic distance on the WGS84 ellipsoid (exact geodesic nearest, as postcodes.io), scipy's answer is the great-circle nearest. Build excludes reading the CSV, which is listed apart.\n",
        f(&o, "postcodes"),
        f(&o, "centroids"),
        f(&o, "queries")
    )?;
    writeln!(
        md,
        "| | postcode-operator (grid, `pipeline/src/grid.rs`) | scipy cKDTree (`workers=1`) | target |"
    )?;
    writeln!(md, "|---|---:|---:|---|")?;
    let qps = f(&o, "batch_queries_per_s");
    writeln!(md, "| queries/s, file order, in batches of 4096 (`nearest_many`, as the enricher asks; scipy: one `query` call) | {:.0} | {:.0} | ≥ 1,000,000: {} |", qps, f(&t, "queries_per_s"), verdict(qps >= 1e6))?;
    writeln!(
        md,
        "| queries/s, file order, one `nearest` call a query | {:.0} | | |",
        f(&o, "queries_per_s")
    )?;
    writeln!(
        md,
        "| queries/s, batches of 4096 sorted as the enricher claims them | {:.0} | | |",
        f(&o, "batch_sorted_queries_per_s")
    )?;
    writeln!(
        md,
        "| index build | {:.2} s | {:.2} s | ≤ 5 s: {} |",
        f(&o, "build_s"),
        f(&t, "build_s"),
        verdict(f(&o, "build_s") <= 5.0)
    )?;
    writeln!(
        md,
        "| reading the postcode CSV | {:.2} s | {:.2} s | |",
        f(&o, "parse_s"),
        f(&t, "parse_s")
    )?;
    writeln!(
        md,
        "| index memory | {:.0} MiB (RSS growth) | {:.0} MiB (tree arrays) | |",
        mib(f(&o, "index_rss_kib") as u64),
        f(&t, "tree_bytes") / 1048576.0
    )?;
    writeln!(
        md,
        "| process peak RSS | {:.0} MiB | {:.0} MiB | |\n",
        mib(ours.peak_rss_kib),
        mib(theirs.peak_rss_kib)
    )?;
    Ok(())
}

struct E2e {
    rows: u64,
    cold: Measured,
}

fn local_offline(ctx: &Ctx, input: &Path, name: &str, cold: bool) -> Result<(Measured, PathBuf)> {
    local_on(ctx, input, name, cold, false)
}

/// `local` with the offline provider on SQLite (a new file) or, with
/// `postgres`, on a new database of the bench's PostgreSQL server.
fn local_on(ctx: &Ctx, input: &Path, name: &str, cold: bool, postgres: bool) -> Result<(Measured, PathBuf)> {
    let db = ctx.work.join(format!("e2e-{name}.db"));
    let remove_db = || {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
        }
    };
    remove_db();
    let database = if postgres {
        ctx.psql("DROP DATABASE IF EXISTS bench_e2e")?;
        ctx.psql("CREATE DATABASE bench_e2e")?;
        let (server, _) = ctx
            .args
            .database_url
            .rsplit_once('/')
            .context("--database-url without a database")?;
        format!("{server}/bench_e2e")
    } else {
        db.display().to_string()
    };
    let tmp = ctx.work.join("tmp");
    if cold {
        let _ = std::fs::remove_dir_all(&ctx.index_cache);
    }
    std::fs::create_dir_all(&tmp)?;
    let out = ctx.work.join(format!("e2e-{name}.csv"));
    let m = measure(
        ctx.bin("postcode-operator")
            .arg("local")
            .arg(input)
            .arg("--offline-postcodes")
            .arg(&ctx.nspl)
            .arg("--db")
            .arg(&database)
            .arg("--out")
            .arg(&out)
            .env("TMPDIR", &tmp),
        &ctx.log(&format!("local-{name}")),
    )?;
    remove_db();
    if postgres {
        ctx.psql("DROP DATABASE bench_e2e")?;
    }
    Ok((m, out))
}

/// The Python script's run on `input`, and its output.
fn python_e2e(ctx: &Ctx, input: &Path, name: &str) -> Result<(Measured, PathBuf)> {
    let py_out = ctx.work.join(format!("python-{name}.csv"));
    let python = measure(
        Command::new(&ctx.args.python)
            .arg("bench/reference.py")
            .arg("e2e")
            .arg(&ctx.nspl)
            .arg(input)
            .arg(&py_out),
        &ctx.log(&format!("python-e2e-{name}")),
    )?;
    Ok((python, py_out))
}

/// Rows where both outputs name a postcode, and how many name a postcode as
/// near: our geodesic distance within the sphere/ellipsoid bounds
/// ([`pipeline::geo::SPHERE_TO_ELLIPSOID`]) of the script's great-circle one,
/// give or take the 0.1 m both are written to. Postcodes sharing a centroid
/// may differ: the script takes any of them, in `pcd` form.
fn agreement(ours: &Path, theirs: &Path) -> Result<(u64, u64)> {
    let (mut a, mut b) = (csv::Reader::from_path(ours)?, csv::Reader::from_path(theirs)?);
    let col = |h: &csv::StringRecord, name: &str| {
        h.iter()
            .position(|c| c == name)
            .with_context(|| format!("{name} column"))
    };
    let (ha, hb) = (a.headers()?.clone(), b.headers()?.clone());
    let (pa, pb, da, db) = (
        col(&ha, "postcode")?,
        col(&hb, "postcode")?,
        col(&ha, "distance_m")?,
        col(&hb, "distance_m")?,
    );
    let (mut both, mut same) = (0, 0);
    for (x, y) in a.records().zip(b.records()) {
        let (x, y) = (x?, y?);
        if !x[pa].is_empty() && !y[pb].is_empty() {
            both += 1;
            let (ours, script): (f64, f64) = (x[da].parse()?, y[db].parse()?);
            let (lo, hi) = pipeline::geo::SPHERE_TO_ELLIPSOID;
            same += u64::from(ours >= script * lo - 0.1 && ours <= script * hi + 0.1);
        }
    }
    Ok((both, same))
}

fn e2e_section(ctx: &Ctx, inputs: &[(u64, PathBuf)], md: &mut String) -> Result<Vec<E2e>> {
    let (rows, input) = inputs
        .iter()
        .find(|(n, _)| *n == 1_000_000)
        .or(inputs.last())
        .cloned()
        .context("no input")?;
    let name = size_name(rows);
    eprintln!("end to end {name}");
    let (cold, ours) = local_offline(ctx, &input, &name, true)?;
    let (warm, _) = local_offline(ctx, &input, &format!("{name}-warm"), false)?;
    let (python, py_out) = python_e2e(ctx, &input, &name)?;
    let (both, same) = agreement(&ours, &py_out)?;
    let ratio = cold.seconds / python.seconds;
    writeln!(md, "## 3. End to end\n")?;
    writeln!(md, "`postcode-operator local FILE --offline-postcodes nspl-latlon.csv.gz` (SQLite; reader, 4 enricher Jobs, export; every row stored) against `bench/reference.py e2e`, the script a user would write (csv module, scipy cKDTree, csv writer; no database), on the {name}-row input.\n")?;
    writeln!(md, "| | wall | peak RSS |\n|---|---:|---:|")?;
    writeln!(
        md,
        "| `local`, first run (parses the postcode file, caching it) | {:.1} s | {:.0} MiB |",
        cold.seconds,
        mib(cold.peak_rss_kib)
    )?;
    writeln!(
        md,
        "| `local`, postcode cache warm | {:.1} s | {:.0} MiB |",
        warm.seconds,
        mib(warm.peak_rss_kib)
    )?;
    writeln!(
        md,
        "| Python script | {:.1} s | {:.0} MiB |",
        python.seconds,
        mib(python.peak_rss_kib)
    )?;
    writeln!(
        md,
        "\nRatio, first run / Python: **{ratio:.2}** (target ≤ 0.5: {}); warm: {:.2}.",
        verdict(ratio <= 0.5),
        warm.seconds / python.seconds
    )?;
    writeln!(md, "As near a postcode as the script's on {same} of the {both} rows where both name a postcode ({:.3} %): the script measures great circles on a sphere, we geodesics on the WGS84 ellipsoid, so the distances agree within that ratio (0.9944–1.0045, `pipeline::geo::SPHERE_TO_ELLIPSOID`) ± 0.1 m. Where postcodes share a centroid the script names any of them; we name the alphabetically first, as postcodes.io does.\n", 100.0 * same as f64 / both.max(1) as f64)?;
    shapes_table(ctx, rows, &input, &python, md)?;
    Ok(vec![E2e { rows, cold }])
}

/// End to end on both databases and on two input shapes (the harness's file
/// and one with every row jittered), the postcode cache warm; each database's
/// outputs compared byte for byte. Runs back to back, so the ratios hold on a busy machine.
fn shapes_table(ctx: &Ctx, rows: u64, input: &Path, python: &Measured, md: &mut String) -> Result<()> {
    let name = size_name(rows);
    let jittered = ctx.work.join(format!("jittered-{name}.csv"));
    crate::synth(&ctx.real, rows, &jittered, 20261201, crate::Shape::EVERY_ROW)?;
    writeln!(
        md,
        "### By database and input shape
"
    )?;
    writeln!(md, "The same run on SQLite and on PostgreSQL (a new database on the bench's server), postcode cache warm, back to back, on the {name}-row harness file and on a file whose every row is moved by up to ±0.002° (`postcode-bench synth --jitter 0.002 --jitter-all`: about one distinct coordinate a row). Outputs of the two databases compared byte for byte.\n")?;
    writeln!(md, "| input | SQLite | PostgreSQL | PostgreSQL / SQLite (target ≤ 1.2) | Python script | SQLite / Python (target ≤ 0.5) | outputs |")?;
    writeln!(md, "|---|---:|---:|---:|---:|---:|---|")?;
    let shapes = [
        ("harness (copies jittered ±0.001°)", "harness", input),
        ("every row jittered ±0.002°", "jittered", jittered.as_path()),
    ];
    for (shape, tag, file) in shapes {
        eprintln!("end to end {name}, {shape}");
        let (sqlite, s_out) = local_on(ctx, file, &format!("{name}-{tag}-sqlite"), false, false)?;
        let (pg, p_out) = local_on(ctx, file, &format!("{name}-{tag}-pg"), false, true)?;
        let script = if file == input {
            python.clone() // measured by the section above
        } else {
            python_e2e(ctx, file, &format!("{name}-{tag}"))?.0
        };
        let same = files_equal(&s_out, &p_out)?;
        let (r_pg, r_py) = (pg.seconds / sqlite.seconds, sqlite.seconds / script.seconds);
        writeln!(
            md,
            "| {shape} | {:.1} s | {:.1} s | {r_pg:.2} {} | {:.1} s | {r_py:.2} {} | {} |",
            sqlite.seconds,
            pg.seconds,
            verdict(r_pg <= 1.2),
            script.seconds,
            verdict(r_py <= 0.5),
            if same { "identical" } else { "**differ**" }
        )?;
    }
    writeln!(md)?;
    Ok(())
}

fn memory_section(
    ctx: &Ctx,
    inputs: &[(u64, PathBuf)],
    loads: &[Load],
    e2e: &[E2e],
    md: &mut String,
) -> Result<()> {
    let mut locals: Vec<(u64, Measured)> = e2e.iter().map(|e| (e.rows, e.cold.clone())).collect();
    // 10M rows end to end on both databases (issue 17: SQLite under 60 s,
    // PostgreSQL within 1.5× of it), outputs compared byte for byte.
    let mut large = Vec::new();
    for (n, input) in inputs {
        if *n >= 10_000_000 {
            let name = size_name(*n);
            eprintln!("local {name}");
            let (m, s_out) = local_offline(ctx, input, &name, false)?;
            eprintln!("local {name} on PostgreSQL");
            let (pg, p_out) = local_on(ctx, input, &format!("{name}-pg"), false, true)?;
            let same = files_equal(&s_out, &p_out)?;
            let _ = std::fs::remove_file(s_out);
            let _ = std::fs::remove_file(p_out);
            large.push((*n, m.clone(), pg, same));
            locals.push((*n, m));
        }
    }
    writeln!(md, "## 4. Memory\n")?;
    writeln!(md, "Peak RSS by component and input size (target ≤ 256 MiB for any component at 10M rows). The enricher is shard 0 of 4 with the offline provider on SQLite.\n")?;
    writeln!(md, "| rows | reader → PostgreSQL | reader → SQLite | enricher | `local` (largest process) | `local` wall |")?;
    writeln!(md, "|---:|---:|---:|---:|---:|---:|")?;
    for l in loads {
        let local = locals.iter().find(|(n, _)| *n == l.rows);
        let ok = |kib: u64| {
            if l.rows >= 10_000_000 && mib(kib) > 256.0 {
                " **over**"
            } else {
                ""
            }
        };
        writeln!(
            md,
            "| {} | {:.0} MiB{} | {:.0} MiB{} | {:.0} MiB{} | {} | {} |",
            size_name(l.rows),
            mib(l.pg.peak_rss_kib),
            ok(l.pg.peak_rss_kib),
            mib(l.sqlite.peak_rss_kib),
            ok(l.sqlite.peak_rss_kib),
            mib(l.enricher.peak_rss_kib),
            ok(l.enricher.peak_rss_kib),
            local.map_or("".into(), |(_, m)| format!(
                "{:.0} MiB{}",
                mib(m.peak_rss_kib),
                ok(m.peak_rss_kib)
            )),
            local.map_or("".into(), |(_, m)| format!("{:.1} s", m.seconds)),
        )?;
    }
    writeln!(md)?;
    for (n, sqlite, pg, same) in large {
        let ratio = pg.seconds / sqlite.seconds;
        writeln!(
            md,
            "{} rows end to end, postcode cache warm: SQLite {:.1} s (target < 60 s: {}), PostgreSQL {:.1} s, peak RSS {:.0} MiB; PostgreSQL / SQLite **{ratio:.2}** (target ≤ 1.5: {}); outputs {}.\n",
            size_name(n),
            sqlite.seconds,
            verdict(sqlite.seconds < 60.0),
            pg.seconds,
            mib(pg.peak_rss_kib),
            verdict(ratio <= 1.5),
            if same { "identical" } else { "**differ**" }
        )?;
    }
    Ok(())
}

/// Whether two files hold the same bytes, read a block at a time (10M-row outputs are GBs); both end-to-end tables compare outputs with it.
fn files_equal(a: &Path, b: &Path) -> Result<bool> {
    use std::io::Read;
    let (mut a, mut b) = (std::fs::File::open(a)?, std::fs::File::open(b)?);
    if a.metadata()?.len() != b.metadata()?.len() {
        return Ok(false);
    }
    let (mut x, mut y) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let n = a.read(&mut x)?;
        if n == 0 {
            return Ok(true);
        }
        b.read_exact(&mut y[..n])?;
        if x[..n] != y[..n] {
            return Ok(false);
        }
    }
}

fn api_section(ctx: &Ctx, md: &mut String) -> Result<()> {
    writeln!(md, "## 5. API efficiency\n")?;
    writeln!(md, "`postcode-operator local` on the real 100k-row file against `postcodes-io-test-server` (answers from the NSPL file; no faults), 4 shards, SQLite. The floor is one request per 100 distinct coordinates at the first radius; widened requests (2000 m, widesearch) are listed apart. The quota is checked by the server: its busiest one-second window.\n")?;
    writeln!(md, "| quota Q | distinct coordinates | requests at 100 m | floor ⌈coords/100⌉ | ratio (≤ 1.02) | at 2000 m | widesearch | busiest second | wall | 1.1 × requests/Q + 5 s | |")?;
    writeln!(md, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")?;
    for &q in &ctx.args.quotas {
        eprintln!("api at {q} rps");
        let mut server = Command::new(ctx.bin.join("postcodes-io-test-server"))
            .arg("--postcodes")
            .arg(&ctx.nspl)
            .stdout(Stdio::piped())
            .stderr(File::create(ctx.log(&format!("test-server-{q}")))?)
            .spawn()?;
        let mut first = String::new();
        BufReader::new(server.stdout.take().context("server stdout")?).read_line(&mut first)?;
        let base = first
            .trim()
            .strip_prefix("listening on ")
            .context("test server did not start")?
            .to_string();
        let db = ctx.work.join("api.db");
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
        }
        let out = ctx.work.join("api.csv");
        let m = measure(
            ctx.bin("postcode-operator")
                .arg("local")
                .arg(&ctx.real)
                .args(["--api-url", &base, "--quota-rps", &q.to_string()])
                .arg("--db")
                .arg(&db)
                .arg("--out")
                .arg(&out),
            &ctx.log(&format!("api-{q}")),
        )?;
        let stats: postcodes_io_test_server::Stats = ctx
            .rt
            .block_on(async { reqwest::get(format!("{base}/__stats")).await?.json().await })?;
        let _ = server.kill();
        let _ = server.wait();
        let coords: u64 = Command::new("sqlite3")
            .arg(&db)
            .arg("SELECT COUNT(*) FROM lookups")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(0);
        let by = |r: &str| stats.answered_by_radius.get(r).copied().unwrap_or(0);
        let first = by("100");
        let floor = coords.div_ceil(100);
        let wide = stats
            .answered_by_radius
            .iter()
            .filter(|(k, _)| k.as_str() != "100" && k.as_str() != "2000")
            .map(|(_, v)| v)
            .sum::<u64>();
        let limit = 1.1 * stats.requests as f64 / q + 5.0;
        let ratio = first as f64 / floor.max(1) as f64;
        writeln!(
            md,
            "| {q} | {coords} | {first} | {floor} | {ratio:.3} {} | {} | {wide} | {} {} | {:.1} s | {limit:.1} s | {} |",
            verdict(ratio <= 1.02),
            by("2000"),
            stats.max_per_second,
            if stats.max_per_second as f64 <= q { "(≤ Q)" } else { "**(over Q)**" },
            m.seconds,
            verdict(m.seconds <= limit)
        )?;
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
        }
        let _ = std::fs::remove_file(out);
    }
    writeln!(md)?;
    Ok(())
}
