//! `postcode-bench`: the benchmark harness behind `make bench` (`run`), the
//! synthetic inputs it measures on (`synth`) and the offline lookup timing
//! (`lookups`). README.md "Performance" says what it measures; BENCHMARKS.md
//! holds the last run.
use std::{
    fs::File,
    io::{BufRead, BufReader, BufWriter, Write},
    path::PathBuf,
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use rand::{RngExt, SeedableRng};

mod harness;

#[derive(Parser)]
#[command(about = "Benchmarks of postcode-operator (make bench)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Writes a synthetic input CSV of `rows` rows: the real file's rows in order,
    /// repeated, every copy after the first moved by a uniform jitter of up to
    /// ±0.001° (about ±110 m) in latitude and longitude, 6 decimals like the original.
    /// `--jitter 0.002 --jitter-all`: every row moved by up to ±0.002°, the first copy too
    /// (about as many distinct coordinates as rows).
    Synth {
        #[arg(long)]
        from: PathBuf,
        #[arg(long)]
        rows: u64,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 20261129)]
        seed: u64,
        /// Largest move in degrees.
        #[arg(long, default_value_t = 0.001)]
        jitter: f64,
        /// Move the first copy of the real rows too.
        #[arg(long)]
        jitter_all: bool,
    },
    /// The whole benchmark (`make bench`): every measurement next to its
    /// reference, written as Markdown.
    Run(harness::RunArgs),
    /// Offline index: parse and build time, memory, and nearest-postcode queries
    /// per second on one core (this thread only), the queries taken from a CSV's
    /// first two columns in file order. Prints JSON.
    Lookups {
        #[arg(long)]
        postcodes: PathBuf,
        #[arg(long)]
        queries: PathBuf,
        /// Query passes over the file; the best pass is reported.
        #[arg(long, default_value_t = 3)]
        passes: usize,
    },
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Synth {
            from,
            rows,
            out,
            seed,
            jitter,
            jitter_all,
        } => synth(
            &from,
            rows,
            &out,
            seed,
            Shape {
                jitter,
                all: jitter_all,
            },
        ),
        Cmd::Lookups {
            postcodes,
            queries,
            passes,
        } => lookups(&postcodes, &queries, passes),
        Cmd::Run(args) => harness::run(args),
    }
}

/// How a synthetic file moves the real coordinates.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Shape {
    /// Largest move in degrees, in latitude and in longitude.
    pub jitter: f64,
    /// Whether the first copy of the real rows moves too.
    pub all: bool,
}

impl Shape {
    /// The harness's file: copies after the first moved by up to ±0.001°.
    pub const COPIES: Shape = Shape {
        jitter: 0.001,
        all: false,
    };
    /// Every row moved by up to ±0.002°: about one distinct coordinate a row.
    pub const EVERY_ROW: Shape = Shape {
        jitter: 0.002,
        all: true,
    };
}

pub(crate) fn synth(from: &PathBuf, rows: u64, out: &PathBuf, seed: u64, shape: Shape) -> Result<()> {
    let input = BufReader::new(File::open(from).with_context(|| format!("open {}", from.display()))?);
    let mut lines = input.lines();
    let header = lines.next().context("empty file")??;
    let mut coords = Vec::new();
    for line in lines {
        let line = line?;
        let mut it = line.split(',');
        let (Some(a), Some(b)) = (it.next(), it.next()) else {
            continue;
        };
        if let (Ok(a), Ok(b)) = (a.trim().parse::<f64>(), b.trim().parse::<f64>()) {
            coords.push((a, b));
        }
    }
    if coords.is_empty() {
        bail!("{}: no coordinates", from.display());
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let tmp = out.with_extension("partial");
    let mut w = BufWriter::with_capacity(1 << 20, File::create(&tmp)?);
    writeln!(w, "{header}")?;
    for i in 0..rows {
        let (mut lat, mut lon) = coords[(i % coords.len() as u64) as usize];
        if shape.all || i >= coords.len() as u64 {
            lat += rng.random_range(-shape.jitter..=shape.jitter);
            lon += rng.random_range(-shape.jitter..=shape.jitter);
        }
        writeln!(w, "{lat:.6},{lon:.6}")?;
    }
    w.flush()?;
    drop(w);
    std::fs::rename(&tmp, out)?;
    Ok(())
}

/// Resident set size of this process now, KiB (Linux `/proc/self/statm`).
fn rss_kib() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse::<u64>().ok())
        .unwrap_or(0)
        * 4
}

fn read_coords(path: &PathBuf) -> Result<Vec<pipeline::geo::LatLon>> {
    let input = BufReader::new(File::open(path).with_context(|| format!("open {}", path.display()))?);
    let mut out = Vec::new();
    for line in input.lines().skip(1) {
        let line = line?;
        let mut it = line.split(',');
        if let (Some(Ok(lat)), Some(Ok(lon))) = (
            it.next().map(|a| a.trim().parse()),
            it.next().map(|b| b.trim().parse()),
        ) {
            out.push(pipeline::geo::LatLon { lat, lon });
        }
    }
    Ok(out)
}

fn lookups(postcodes: &std::path::Path, queries: &PathBuf, passes: usize) -> Result<()> {
    use pipeline::offline::OfflineIndex;
    use std::time::Instant;
    let rss0 = rss_kib();
    let t = Instant::now();
    let parsed = OfflineIndex::parse_file(postcodes)?;
    let parse_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let index = OfflineIndex::from_parsed(parsed);
    let build_s = t.elapsed().as_secs_f64();
    let index_kib = rss_kib().saturating_sub(rss0);
    let qs = read_coords(queries)?;
    let mut best = f64::INFINITY;
    let mut found = 0usize;
    for _ in 0..passes.max(1) {
        let t = Instant::now();
        found = qs
            .iter()
            .filter(|q| index.nearest(**q, 20_000.0).is_some())
            .count();
        best = best.min(t.elapsed().as_secs_f64());
    }
    // How the enricher asks: a batch at a time (`nearest_many`, memory reads overlapped across queries).
    let mut best_many = f64::INFINITY;
    for _ in 0..passes.max(1) {
        let t = Instant::now();
        let n: usize = qs
            .chunks(4096)
            .map(|batch| {
                index
                    .nearest_many(batch, 20_000.0)
                    .iter()
                    .filter(|n| n.is_some())
                    .count()
            })
            .sum();
        assert_eq!(n, found);
        best_many = best_many.min(t.elapsed().as_secs_f64());
    }
    // The enricher's order: each claimed batch is sorted by (latitude, longitude).
    let mut sorted = qs.clone();
    for batch in sorted.chunks_mut(4096) {
        batch.sort_by(|a, b| a.lat.total_cmp(&b.lat).then(a.lon.total_cmp(&b.lon)));
    }
    let mut best_sorted = f64::INFINITY;
    for _ in 0..passes.max(1) {
        let t = Instant::now();
        let n: usize = sorted
            .chunks(4096)
            .map(|batch| {
                index
                    .nearest_many(batch, 20_000.0)
                    .iter()
                    .filter(|n| n.is_some())
                    .count()
            })
            .sum();
        assert_eq!(n, found);
        best_sorted = best_sorted.min(t.elapsed().as_secs_f64());
    }
    println!(
        "{}",
        serde_json::json!({
            "batch_sorted_query_s": best_sorted, "batch_sorted_queries_per_s": qs.len() as f64 / best_sorted,
            "postcodes": index.postcodes(), "centroids": index.centroids(),
            "parse_s": parse_s, "build_s": build_s, "index_rss_kib": index_kib,
            "queries": qs.len(), "found": found, "query_s": best, "queries_per_s": qs.len() as f64 / best,
            "batch_query_s": best_many, "batch_queries_per_s": qs.len() as f64 / best_many,
        })
    );
    Ok(())
}
