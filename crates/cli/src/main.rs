//! The `vmatrix` command: the one binary of vMatrix. It parses arguments, sets up logging and
//! hands each subcommand to the library crates; it holds no logic of its own beyond printing.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "vmatrix", version, about = "Run Internet services as VMs over a shared pool of machines")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build and inspect the reference guest.
    #[command(subcommand)]
    Guest(GuestCommand),
}

#[derive(Subcommand)]
enum GuestCommand {
    /// Build the reference guest disk (cached: seconds when nothing changed).
    Build {
        /// Where to write the raw disk image.
        #[arg(long, default_value = "vmatrix-guest.img")]
        out: PathBuf,
        /// Disk size, e.g. 64M or 4G; above 64M the data partition is padded with realistic data.
        #[arg(long, default_value = "64M", value_parser = parse_size)]
        size: u64,
        /// Service name baked into the image.
        #[arg(long, default_value = "reference")]
        service: String,
        /// Version baked into the image.
        #[arg(long, default_value = "1")]
        version: String,
    },
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let mult = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("unknown unit {c:?} in {s:?}: use K, M, G or T")),
            };
            (&s[..i], mult)
        }
        _ => (s, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size: use a whole number with K, M, G or T (e.g. 4G)"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VMATRIX_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Guest(GuestCommand::Build {
            out,
            size,
            service,
            version,
        }) => {
            let opts = vmatrix_guest::BuildOptions {
                out,
                size,
                service,
                version,
            };
            let image = vmatrix_guest::build(&opts)
                .with_context(|| format!("building the reference guest at {}", opts.out.display()))?;
            println!(
                "{} {} in {:.2}s ({} bytes)",
                if image.built { "built" } else { "up to date:" },
                image.disk.display(),
                image.elapsed.as_secs_f64(),
                std::fs::metadata(&image.disk).map(|m| m.len()).unwrap_or(0)
            );
        }
    }
    Ok(())
}
