//! The `mailcanary` binary: see `cli.rs` for the commands.

mod cli;
mod once;

fn main() -> std::process::ExitCode {
    cli::main()
}
