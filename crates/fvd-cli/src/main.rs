//! `fvd` — create, inspect, convert, compare, check and exercise FVD images,
//! in qemu-img's and qemu-io's vocabulary.
//!
//! Every failure prints one line, `fvd: <message>`, naming the file and the
//! problem, and exits with status 1 (`compare` uses 2 for errors, `check` its
//! own codes).

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod clock;
#[macro_use]
mod out;
mod cmd;
mod common;
mod secrets;
mod size;
mod snapshot_list;

/// The command line.
#[derive(Parser, Debug)]
#[command(
    name = "fvd",
    version,
    about = "Fast Virtual Disk image tool (speaks qemu-img's and qemu-io's vocabulary)",
    propagate_version = true
)]
struct Cli {
    /// Objects, like qemu-img's --object. A remote base store:
    /// `s3,endpoint=URL,region=NAME,url-style=path|virtual-host,access-key-id=ID,
    /// secret-access-key-file=PATH,session-token-file=PATH` (each wins over
    /// the AWS_* variables; secrets only from files). The passphrase of
    /// encrypted images: `secret,id=ID,file=PATH` (`file=-`: a line of
    /// standard input; `data=TEXT` for tests; `format=raw|base64`), named by
    /// `-o encrypt.key-secret=ID` or `--image-opts ...,encrypt.key-secret=ID`
    /// (the only secret given is used when none is named)
    #[arg(long, global = true, value_name = "TYPE,KEY=VALUE,...")]
    object: Vec<String>,
    /// Image arguments are qemu-img style option lists:
    /// `driver=fvd,file.filename=PATH,encrypt.key-secret=ID`
    #[arg(long = "image-opts", global = true)]
    image_opts: bool,
    #[command(subcommand)]
    command: Command,
}

/// The subcommands.
#[derive(Subcommand, Debug)]
enum Command {
    /// Create a new image (like qemu-img create).
    Create(cmd::create::Args),
    /// Show what an image is and how it is laid out (like qemu-img info).
    Info(cmd::info::Args),
    /// Show where the data of an image is (like qemu-img map).
    Map(cmd::map::Args),
    /// Copy an image into a new one, skipping zeros (like qemu-img convert).
    Convert(cmd::convert::Args),
    /// Compare the content of two images (like qemu-img compare).
    Compare(cmd::compare::Args),
    /// Check the metadata of an image (like qemu-img check).
    Check(cmd::check::Args),
    /// Change the virtual size of an image (like qemu-img resize).
    Resize(cmd::resize::Args),
    /// Write an image's data into its base (like qemu-img commit).
    Commit(cmd::commit::Args),
    /// Put an image over another base, or none (like qemu-img rebase).
    Rebase(cmd::rebase::Args),
    /// Change image options in place (like qemu-img amend).
    Amend(cmd::amend::Args),
    /// List, create, apply or delete internal snapshots (like qemu-img
    /// snapshot), also of an image `fvd serve` exports (--server).
    Snapshot(cmd::snapshot::Args),
    /// Run qemu-io style commands on an image (like qemu-io).
    Io(cmd::io::Args),
    /// Show copy-on-write and free writes on a built-in example.
    Demo(cmd::demo::Args),
    /// Export an image over NBD (like qemu-nbd) or vhost-user-blk (like
    /// qemu-storage-daemon --export type=vhost-user-blk).
    Serve(Box<cmd::serve::ServeArgs>),
    /// One cache per host for a remote base shared by many images: serve
    /// the base read-only over NBD through a local, checked, size-limited
    /// cache (`fvd cache serve`), or show where a cache lives.
    Cache(cmd::cache::Args),
    /// Copy everything from the base into the image, then detach the base.
    Prefetch(cmd::prefetch::Args),
    /// Show, export or import an image's prefetch profile.
    Profile(cmd::profile::Args),
    /// Manage the key slots of an encrypted image (like cryptsetup
    /// luksAddKey, luksRemoveKey, luksChangeKey, luksKillSlot).
    Luks(cmd::luks::Args),
    /// Export the virtual disk as one file over FUSE (like qemu-storage-daemon
    /// --export type=fuse).
    Mount(cmd::mount::MountArgs),
}

impl Command {
    /// Exit status for an error of this command.
    fn error_code(&self) -> u8 {
        match self {
            Command::Compare(_) => 2,
            _ => 1,
        }
    }
}

/// Squash a message onto one line.
fn one_line(msg: &str) -> String {
    msg.split('\n')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

fn main() -> ExitCode {
    // Before any thread exists (it edits the environment).
    if std::env::args().nth(1).as_deref() == Some("serve") {
        cmd::serve_start::capture_activation();
    }
    // --image-opts arguments become paths before clap sees them.
    let (args, image_keys) = match secrets::rewrite_image_opts(std::env::args().collect()) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("fvd: {}", one_line(&format!("{e:#}")));
            return ExitCode::from(1);
        }
    };
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                let _ = e.print();
                return ExitCode::from(1);
            }
            // The message is the first paragraph of clap's report.
            let text = e.to_string();
            let para: Vec<&str> = text
                .lines()
                .map(str::trim)
                .take_while(|l| !l.is_empty())
                .collect();
            let msg = para.join(" ");
            let msg = msg.strip_prefix("error: ").unwrap_or(&msg);
            eprintln!("fvd: {} (try 'fvd --help')", one_line(msg));
            let compare = std::env::args().nth(1).as_deref() == Some("compare");
            return ExitCode::from(if compare { 2 } else { 1 });
        }
    };
    for spec in &cli.object {
        // The message never repeats the option: it may hold a secret.
        let r = if secrets::is_secret(spec) {
            secrets::add_object(spec).map_err(|e| format!("{e:#}"))
        } else {
            fvd_remote::s3::configure(spec)
        };
        if let Err(msg) = r {
            eprintln!("fvd: --object: {}", one_line(&msg));
            return ExitCode::from(cli.command.error_code());
        }
    }
    for (path, id) in &image_keys {
        if let Err(e) = secrets::assign(path, id) {
            eprintln!("fvd: --image-opts: {}", one_line(&format!("{e:#}")));
            return ExitCode::from(cli.command.error_code());
        }
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fvd: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let code = cli.command.error_code();
    // How images name their bases: local files, NBD and HTTP(S) URLs, qcow2.
    let opener = secrets::with_keys(fvd_remote::opener());
    let o = &opener;
    let result = rt.block_on(async move {
        match cli.command {
            Command::Create(a) => cmd::create::run(a, o).await,
            Command::Info(a) => cmd::info::run(a, o).await,
            Command::Map(a) => cmd::map::run(a, o).await,
            Command::Convert(a) => cmd::convert::run(a, o).await,
            Command::Compare(a) => cmd::compare::run(a, o).await,
            Command::Check(a) => cmd::check::run(a, o).await,
            Command::Resize(a) => cmd::resize::run(a, o).await,
            Command::Commit(a) => cmd::commit::run(a, o).await,
            Command::Rebase(a) => cmd::rebase::run(a, o).await,
            Command::Amend(a) => cmd::amend::run(a, o).await,
            Command::Snapshot(a) => cmd::snapshot::run(a, o).await,
            Command::Io(a) => cmd::io::run(a, o).await,
            Command::Prefetch(a) => cmd::prefetch::run(a, o).await,
            Command::Profile(a) => cmd::profile::run(a, o).await,
            Command::Demo(a) => cmd::demo::run(a).await,
            Command::Serve(a) => cmd::serve::run(*a, o).await,
            Command::Cache(a) => cmd::cache::run(a, o).await,
            Command::Mount(a) => cmd::mount::run(a, o).await,
            Command::Luks(a) => cmd::luks::run(a, o).await,
        }
    });
    let output = out::finish();
    match (result, output) {
        (Ok(status), Ok(())) => ExitCode::from(status),
        (Err(e), _) => {
            report(&one_line(&format!("{e:#}")));
            ExitCode::from(code)
        }
        (Ok(_), Err(msg)) => {
            report(&msg);
            ExitCode::from(code)
        }
    }
}

/// Print `fvd: <msg>` on standard error (never panicking if it is closed).
fn report(msg: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "fvd: {msg}");
}
