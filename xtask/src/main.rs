//! `cargo xtask …`: the KDS Lease Lab driver and the project's test command.
//!
//! Plain Rust instead of shell scripts; one module per command.

mod emulators;
mod test;
mod util;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "KDS Lease Lab: drive the lab and run the project's tests"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The project's test command: emulators, fmt, clippy, every test.
    Test(test::Args),
    /// Install (if missing) and run the pinned emulators in the foreground until Ctrl-C,
    /// printing the AWS_ENDPOINT_URL_* settings to use with them.
    Emulators,
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Test(args) => test::run(args),
        Command::Emulators => emulators::foreground(),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
