//! `postcode-operator`: the Kubernetes operator for `PostcodeImport`s, its
//! upload API, and the `local` runner that runs the same Jobs on one machine.

mod local;
mod plan;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(version, about = "Enrich CSVs of coordinates with the nearest UK postcode")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run an import on this machine: reader and enricher Jobs as local processes, SQLite by default.
    Local(local::LocalArgs),
}

#[tokio::main]
async fn main() {
    pipeline::init_tracing();
    let cli = Cli::parse();
    let code = match cli.command {
        Cmd::Local(args) => match local::run(args).await {
            Ok(code) => code,
            Err(e) => {
                eprintln!("error: {e:#}");
                1
            }
        },
    };
    std::process::exit(code);
}
