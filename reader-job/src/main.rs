//! `reader-job`: loads one import's CSV into the database (DESIGN.md "Shape", step 1).
//!
//! Exit codes: 0 loaded; 2 the input cannot be read (the import is marked
//! failed with the reason; a retry will not help); 1 anything else (retry).

use clap::Parser;
use pipeline::{
    csv_input::{parse_delimiter, CsvOptions},
    egress::EgressPolicy,
    load::{load, Source},
    store::Store,
    EXIT_PERMANENT,
};

#[derive(Parser, Debug)]
#[command(version, about = "Load one import's CSV of coordinates into the database")]
struct Args {
    /// The import's uid (a PostcodeImport's metadata.uid, or a local run's id).
    #[arg(long, env = "IMPORT_UID")]
    import_uid: String,
    /// The import's name, for messages.
    #[arg(long, env = "IMPORT_NAME", default_value = "import")]
    import_name: String,
    /// `upload:<id>`, an http(s) URL, or a file path (plain or gzip; only
    /// with `EGRESS_POLICY=off`, as the `local` runner sets it). What a URL
    /// may reach is decided by the `EGRESS_*` variables (pipeline::egress).
    #[arg(long, env = "IMPORT_SOURCE")]
    source: String,
    /// Number of enricher shards; each coordinate's shard is fixed at load.
    #[arg(long, env = "IMPORT_SHARDS", default_value_t = 4, value_parser = clap::value_parser!(i32).range(1..=64))]
    shards: i32,
    /// `postgres://…` or a SQLite file path / `sqlite://…` URL.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: String,
    /// Latitude column: header name or 1-based number (detected when absent).
    #[arg(long)]
    lat_column: Option<String>,
    /// Longitude column: header name or 1-based number (detected when absent).
    #[arg(long)]
    lon_column: Option<String>,
    /// Field delimiter: , ; tab | (detected when absent).
    #[arg(long)]
    delimiter: Option<String>,
    /// Quoting: `double` or `none` (detected when absent).
    #[arg(long)]
    quote: Option<String>,
}

#[tokio::main]
async fn main() {
    pipeline::init_process();
    pipeline::exit_on_sigterm();
    let args = Args::parse();
    match run(&args).await {
        Ok(()) => {}
        Err((code, e)) => {
            let msg = format!("reader-job: {e:#}");
            eprintln!("{msg}");
            pipeline::write_termination_message(&msg);
            std::process::exit(code);
        }
    }
}

async fn run(args: &Args) -> Result<(), (i32, anyhow::Error)> {
    let retryable = |e: anyhow::Error| (1, e);
    let delimiter = args
        .delimiter
        .as_deref()
        .map(parse_delimiter)
        .transpose()
        .map_err(|e| (EXIT_PERMANENT, e.into()))?;
    let quote = args
        .quote
        .as_deref()
        .map(str::parse)
        .transpose()
        .map_err(|e: pipeline::csv_input::InputError| (EXIT_PERMANENT, e.into()))?;
    let opts = CsvOptions {
        lat_column: args.lat_column.clone(),
        lon_column: args.lon_column.clone(),
        delimiter,
        quote,
    };
    let egress = EgressPolicy::from_env().map_err(|e| (EXIT_PERMANENT, e.into()))?;
    let store = Store::connect(&args.database_url).await.map_err(retryable)?;
    let import = store
        .ensure_import(&args.import_uid, &args.import_name, &args.source, args.shards)
        .await
        .map_err(retryable)?;
    if import.source != args.source || import.shards != args.shards {
        store
            .set_import_source(import.id, &args.source, args.shards)
            .await
            .map_err(retryable)?;
    }
    let import = store
        .import(&args.import_uid)
        .await
        .map_err(retryable)?
        .expect("import exists");
    let source = Source::parse(&args.source);
    let started = std::time::Instant::now();
    match load(&store, &import, &source, &opts, &egress).await {
        Ok(c) => {
            tracing::info!(
                rows = c.rows,
                invalid = c.invalid,
                seconds = started.elapsed().as_secs_f64(),
                "loaded {source}"
            );
            store.close().await;
            Ok(())
        }
        Err(e) if e.is_permanent() => {
            let msg = format!("{source}: {e}");
            store.fail_import(import.id, &msg).await.map_err(retryable)?;
            Err((EXIT_PERMANENT, anyhow::anyhow!(msg)))
        }
        Err(e) => Err((1, e.into())),
    }
}
