//! `fvd cache` — one cache per host for a remote base shared by many
//! images (see `fvd_remote::cache` for how it works).
//!
//! * `fvd cache serve --dir DIR URL` serves the base at URL read-only over
//!   NBD (every option of `fvd serve` that applies: `--socket`, `--bind`,
//!   `--export-name`, `--shared`, TLS, `--fork`, `--pidfile`), reading
//!   through the cache `DIR/<key>.data` + `DIR/<key>.sums`, where the key
//!   hashes the URL and the base's validator. The images of the host use
//!   that export as their base (`-b nbd+unix:///?socket=PATH -F raw`), so
//!   each block crosses the network once.
//! * `fvd cache path --dir DIR URL` prints which files hold the cache of
//!   URL as it is now (a replaced object has a new validator, so a new
//!   cache).

use std::path::PathBuf;

use anyhow::{Result, bail};
use fvd_core::Opener;
use fvd_remote::cache::{self, CacheOptions};
use serde_json::json;

use super::serve::ServeArgs;
use super::serve_extras::PrefetchChoice;
use crate::common::Output;
use crate::size::parse_size;

/// Arguments of `fvd cache`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    pub command: CacheCommand,
}

/// The `fvd cache` subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum CacheCommand {
    /// Serve a remote base read-only over NBD through the host's cache of
    /// it; the VMs' images use that export as their base.
    Serve(Box<ServeCacheArgs>),
    /// Print the files holding the cache of a base.
    Path(PathArgs),
}

/// Where the cache lives and how big it may grow.
#[derive(clap::Args, Debug)]
pub struct CacheArgs {
    /// The cache directory (created if missing), e.g. /var/cache/fvd.
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
    /// Most bytes of cached data (e.g. 20G); beyond it the blocks read
    /// least recently are evicted. Default: no limit.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub max_size: Option<u64>,
    /// Bytes per cache block: the unit fetched, checked and evicted
    /// (default: 4K, doubled for bases over 16 GiB until the base has at
    /// most 4 Mi blocks).
    #[arg(long = "cache-block-size", value_name = "SIZE", value_parser = parse_size)]
    pub block_size: Option<u64>,
}

impl CacheArgs {
    fn options(&self) -> CacheOptions {
        CacheOptions {
            dir: self.dir.clone(),
            max_bytes: self.max_size,
            block_size: self.block_size,
        }
    }
}

/// Arguments of `fvd cache serve`.
#[derive(clap::Args, Debug)]
#[command(mut_arg("image", |a| a
    .value_name("URL")
    .help("The base: nbd://, nbd+unix://, http(s)://, s3:// URL, or a local file")))]
pub struct ServeCacheArgs {
    /// The cache.
    #[command(flatten)]
    pub cache: CacheArgs,
    /// How to serve (the positional argument is the base's URL).
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// Arguments of `fvd cache path`.
#[derive(clap::Args, Debug)]
pub struct PathArgs {
    /// The cache directory.
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Human)]
    pub output: Output,
    /// The base's URL.
    pub url: String,
}

/// Run `fvd cache`.
pub async fn run(a: Args, opener: &Opener) -> Result<u8> {
    match a.command {
        CacheCommand::Serve(s) => serve(*s, opener).await,
        CacheCommand::Path(p) => path(p, opener).await,
    }
}

async fn serve(a: ServeCacheArgs, opener: &Opener) -> Result<u8> {
    let s = &a.serve;
    if s.load_snapshot.is_some() || s.read_only_export || s.read_only {
        bail!(
            "fvd cache serve always exports read-only; -r, -l and --read-only-export do not apply"
        );
    }
    if s.base.prefetch != PrefetchChoice::Off
        || s.base.record_profile
        || s.base.copy_on_read.is_some()
    {
        bail!(
            "fvd cache serve caches what is read; --prefetch, --record-profile and --copy-on-read do not apply"
        );
    }
    if s.vhost.vhost_user_blk.is_some() {
        bail!("fvd cache serve exports over NBD; --vhost-user-blk does not apply");
    }
    super::serve::run_with(a.serve, opener, Some(a.cache.options())).await
}

async fn path(a: PathArgs, opener: &Opener) -> Result<u8> {
    let base = super::serve_cache::open_base(&a.url, opener).await?;
    let validator = base.validator();
    let key = cache::cache_key(&a.url, &validator);
    let (data, sums) = cache::cache_paths(&a.dir, &key);
    match a.output {
        Output::Json => {
            let v = json!({
                "url": cache::key_url(&a.url),
                "validator": validator,
                "key": key,
                "data": data,
                "sums": sums,
                "exists": data.exists() && sums.exists(),
                "size": base.size(),
            });
            outln!("{}", serde_json::to_string_pretty(&v)?);
        }
        Output::Human => {
            outln!("url: {}", cache::key_url(&a.url));
            outln!("validator: {validator}");
            outln!("data: {}", data.display());
            outln!("sums: {}", sums.display());
        }
    }
    Ok(0)
}
