//! The commands. This is the only place that wires the sandbox into the prober (`run` without
//! `--config` starts one in-process).

use std::{net::SocketAddr, process::ExitCode};

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use mailcanary::sandbox::{self, DelayRange, Fault, Sandbox, SandboxConfig, Stage};

#[derive(Parser)]
#[command(name = "mailcanary", version, about = "Synthetic end-to-end email flow prober")]
struct Cli {
    /// Log format: human-readable text, or JSON lines for containers.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run only the sandbox helpdesk (SMTP in, tickets API, IMAP out) and print its addresses.
    Sandbox(SandboxArgs),
}

#[derive(Args)]
struct SandboxArgs {
    /// Inbound MX (SMTP) listen address.
    #[arg(long, default_value = "127.0.0.1:2525")]
    smtp_listen: SocketAddr,
    /// IMAP listen address.
    #[arg(long, default_value = "127.0.0.1:1143")]
    imap_listen: SocketAddr,
    /// Helpdesk API listen address.
    #[arg(long, default_value = "127.0.0.1:8088")]
    http_listen: SocketAddr,
    /// Import delay per mail: `2s` or a range `200ms..2s`.
    #[arg(long, default_value = "200ms..2s")]
    import_delay: DelayRange,
    /// Delivery delay per reply: `1s` or a range `100ms..500ms`.
    #[arg(long, default_value = "100ms..500ms")]
    outbound_delay: DelayRange,
    /// A fault set at start, `STAGE=MODE` (stages inbound import api outbound mailbox; modes ok
    /// stall drop error delay:<duration>). Repeatable.
    #[arg(long = "fault", value_parser = parse_fault)]
    faults: Vec<(Stage, Fault)>,
    /// Address the MX accepts mail for. Repeatable.
    #[arg(long = "support-address", default_value = "support@helpdesk.test")]
    support_addresses: Vec<String>,
    /// The API's `auth_token`.
    #[arg(long, default_value = "sandbox")]
    api_token: String,
    /// The password IMAP LOGIN takes for every mailbox.
    #[arg(long, default_value = "sandbox")]
    mailbox_password: String,
    /// Largest message the MX takes, in bytes.
    #[arg(long, default_value_t = 10 * 1024 * 1024)]
    max_message_size: usize,
}

fn parse_fault(s: &str) -> Result<(Stage, Fault), String> {
    sandbox::faults::parse_assignment(s)
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mailcanary: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Sandbox(args) => run_sandbox(args).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("mailcanary: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::{EnvFilter, fmt};
    let filter = EnvFilter::try_from_env("MAILCANARY_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// Resolves when SIGINT (Ctrl-C) or SIGTERM arrives.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

async fn run_sandbox(args: SandboxArgs) -> anyhow::Result<ExitCode> {
    let config = SandboxConfig {
        smtp_listen: args.smtp_listen,
        imap_listen: args.imap_listen,
        http_listen: args.http_listen,
        support_addresses: args.support_addresses,
        api_token: args.api_token,
        mailbox_password: args.mailbox_password,
        import_delay: args.import_delay,
        outbound_delay: args.outbound_delay,
        max_message_size: args.max_message_size,
        faults: args.faults,
        ..SandboxConfig::default()
    };
    let sb = Sandbox::start(config.clone())
        .await
        .context("starting the sandbox")?;
    // Plain stdout, one `key value` per line, so scripts and humans can both read it.
    println!("smtp {}", sb.smtp_addr);
    println!("imap {}", sb.imap_addr);
    println!("api {}", sb.api_url());
    println!("support {}", config.support_addresses.join(","));
    println!(
        "faults {}",
        sb.faults()
            .all()
            .iter()
            .map(|(s, f)| format!("{s}={f}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    tracing::info!(smtp = %sb.smtp_addr, imap = %sb.imap_addr, api = %sb.http_addr, "sandbox ready");
    shutdown_signal().await;
    tracing::info!("shutting down");
    sb.shutdown().await;
    Ok(ExitCode::SUCCESS)
}
