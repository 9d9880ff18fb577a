//! sandboxd-bench: runs benchmark scenarios against a real `sandboxd-o serve` and `sbxlet fleet`, and prints figures.

mod classes;
mod cluster;
mod dataplane;
mod failover;
mod fanout;
mod floor;
mod load;
mod observe;
mod overload;
mod raw;
mod real;
mod scenarios;
mod soak;

use clap::Parser;
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "sandboxd-bench", about = "Benchmarks sandboxd-o through its public API")]
struct Cli {
    /// Scenarios to run: store-create, store-create-etcd, heartbeats, burst-1k, scheduling-basic, scheduling-selectors, scheduling-only, startup-latency, burst, scale, scale-2x, api-latency, api-tls, failover, soak, real-runtime, data-plane, runtime-classes, overload, watch-fanout, or all.
    #[arg(default_value = "all")]
    scenarios: Vec<String>,
    /// Tiny sizes that only check correctness (every sandbox Running, unique ports), for CI.
    #[arg(long)]
    smoke: bool,
    /// Where the `sandboxd-o` and `sbxlet` binaries are.
    #[arg(long, default_value = "target/release")]
    bin_dir: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let names: Vec<&str> = if cli.scenarios.iter().any(|s| s == "all") {
        scenarios::ALL.to_vec()
    } else {
        cli.scenarios.iter().map(String::as_str).collect()
    };
    for name in &names {
        anyhow::ensure!(
            scenarios::ALL.contains(name),
            "unknown scenario {name:?}; known: {}",
            scenarios::ALL.join(", ")
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let mut reports = Vec::new();
    let mut failed = false;
    for name in names {
        eprintln!("== {name}{}", if cli.smoke { " (smoke)" } else { "" });
        match runtime.block_on(scenarios::run(name, &cli.bin_dir, cli.smoke)) {
            Ok(report) => {
                println!("{}", serde_json::to_string(&report)?);
                reports.push(report);
            }
            Err(e) => {
                eprintln!("scenario {name} failed: {e:#}");
                failed = true;
            }
        }
    }
    scenarios::print_table(&reports);
    if failed {
        std::process::exit(1);
    }
    Ok(())
}
