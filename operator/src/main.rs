//! `postcode-operator`: the Kubernetes operator for `PostcodeImport`s, its
//! upload API, and the `local` runner that runs the same Jobs on one machine.

mod api;
mod auth;
mod controller;
mod error;
mod jobs;
mod lifecycle;
mod local;
mod plan;
mod readiness;
mod run;
mod web;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(version, about = "Enrich CSVs of coordinates with the nearest UK postcode")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once per process: boxing would buy nothing
enum Cmd {
    /// Run an import on this machine: reader and enricher Jobs as local processes, SQLite by default.
    Local(Box<local::LocalArgs>),
    /// Print the PostcodeImport CRD as YAML.
    Crd,
    /// Run the operator: controller and upload API (configured by flags or environment).
    Run(Box<run::RunArgs>),
}

#[tokio::main]
async fn main() {
    pipeline::init_process();
    let cli = Cli::parse();
    let code = match cli.command {
        Cmd::Crd => {
            print!("{}", postcode_resource::crd_yaml());
            0
        }
        Cmd::Run(args) => match run::run(*args).await {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("error: {e:#}");
                1
            }
        },
        Cmd::Local(args) => match local::run(*args).await {
            Ok(code) => code,
            Err(e) => {
                eprintln!("error: {e:#}");
                if e.is::<local::CannotStart>() {
                    pipeline::EXIT_PERMANENT
                } else {
                    1
                }
            }
        },
    };
    std::process::exit(code);
}
