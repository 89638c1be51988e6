//! `postcodes-io-test-server`: the postcodes.io-compatible test server as a
//! process, for benchmarks and manual runs. Prints `listening on http://ADDR`.

use std::{path::PathBuf, sync::Arc};

use clap::Parser;
use pipeline::offline::OfflineIndex;
use postcodes_io_test_server::{router, Faults, ServerState};

#[derive(Parser)]
#[command(
    about = "A postcodes.io-compatible server answering from an ONS postcode file, with fault injection"
)]
struct Args {
    /// ONS postcode file (NSPL/ONSPD style CSV, plain or gzip).
    #[arg(long)]
    postcodes: PathBuf,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// Faults as JSON, e.g. '{"rate_limit":5,"retry_after_s":1,"p_500":0.05}'.
    #[arg(long, default_value = "{}")]
    faults: String,
    /// Seed of the fault dice.
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    pipeline::init_process();
    let args = Args::parse();
    let faults: Faults = serde_json::from_str(&args.faults)?;
    let index = Arc::new(OfflineIndex::load(&args.postcodes)?);
    let listener = tokio::net::TcpListener::bind(&args.listen).await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, router(ServerState::new(index, faults, args.seed))).await?;
    Ok(())
}
