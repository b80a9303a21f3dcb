//! The control socket of `fvd serve --control-socket PATH`: operations on
//! the running image, and the client `fvd snapshot --server PATH` uses.
//!
//! Protocol (documented in README.md): a unix socket (mode 0600); the
//! client sends JSON requests, one per line, in QMP's envelope —
//! `{"execute": "NAME", "arguments": {...}, "id": ANY}` (`arguments` and
//! `id` optional) — and gets one line back per request, in order:
//! `{"return": VALUE}` or `{"error": {"class": "GenericError" |
//! "CommandNotFound", "desc": "MESSAGE"}}`, carrying the request's `id`
//! when it had one. There is no greeting and no capabilities negotiation.
//! Commands:
//!
//! * `query-commands` → the names of the commands;
//! * `query-snapshots` → the snapshots, with the keys of `qemu-img info
//!   --output=json`;
//! * `snapshot-create` `{"name"}` → quiesce (requests in flight finish,
//!   new ones wait), commit, snapshot, resume; returns the snapshot
//!   (QMP's `blockdev-snapshot-internal-sync`);
//! * `snapshot-delete` `{"name"}` and/or `{"id"}` → the deleted snapshot
//!   (QMP's `blockdev-snapshot-delete-internal-sync`);
//! * `query-stats` → the statistics object of `--stats-socket`;
//! * `block_resize` `{"size": BYTES, "shrink": BOOL}` → resize the image
//!   (QMP's `block_resize`; a shrink needs `"shrink": true`, as qemu-img's
//!   `--shrink`): requests in flight finish, new ones wait, the image is
//!   closed, resized and reopened (`fvd_core::live`); returns
//!   `{"old-size", "new-size"}`. Clients see the new size when they
//!   reconnect (NBD has no size-change notice). An optional `"file"` names
//!   the image the caller means: a different one is refused.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Result, anyhow};
use fvd_core::image::snapshot::SnapshotSel;
use fvd_core::{Image, LiveImage};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::snapshot_list::SnapshotJson;

/// Longest request line.
const MAX_LINE: usize = 64 << 10;

/// Every command, for `query-commands`.
const COMMANDS: [&str; 6] = [
    "block_resize",
    "query-commands",
    "query-snapshots",
    "query-stats",
    "snapshot-create",
    "snapshot-delete",
];

/// What answers `query-stats`.
pub type StatsFn = Arc<dyn Fn() -> Value + Send + Sync>;

/// What is told about the image an online resize reopened.
pub type ReopenedFn = Arc<dyn Fn(&Arc<Image>) + Send + Sync>;

/// What the control socket works on.
#[derive(Clone)]
pub struct Target {
    /// The exported image.
    pub live: Arc<LiveImage>,
    /// Answers `query-stats`.
    pub stats: StatsFn,
    /// Called after an online resize; `None` where the export cannot
    /// change size (vhost-user-blk): `block_resize` is refused.
    pub reopened: Option<ReopenedFn>,
}

/// A listening control socket; the socket file goes when it is dropped.
pub struct ControlSocket {
    path: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Listen on `path` and serve requests about `target` until dropped.
pub fn start(target: Target, path: &Path) -> Result<ControlSocket> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    // Only a stale socket is replaced, never another kind of file.
    if let Ok(m) = std::fs::symlink_metadata(path)
        && m.file_type().is_socket()
    {
        let _ = std::fs::remove_file(path);
    }
    let listener = UnixListener::bind(path)
        .map_err(|e| anyhow!("--control-socket {}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| anyhow!("--control-socket {}: {e}", path.display()))?;
    let task = tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            let target = target.clone();
            tokio::spawn(async move {
                let _ = serve_connection(sock, target).await;
            });
        }
    });
    Ok(ControlSocket {
        path: path.to_path_buf(),
        task,
    })
}

async fn serve_connection(sock: UnixStream, target: Target) -> Result<()> {
    let (rd, mut wr) = sock.into_split();
    let mut rd = BufReader::new(rd);
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = (&mut rd)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)
            .await?;
        if n == 0 {
            return Ok(());
        }
        if line.len() > MAX_LINE {
            let e = error(
                "GenericError",
                format!("request longer than {MAX_LINE} bytes"),
            );
            wr.write_all(format!("{e}\n").as_bytes()).await?;
            return Ok(());
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let answer = handle(&line, &target).await;
        wr.write_all(format!("{answer}\n").as_bytes()).await?;
    }
}

fn error(class: &str, desc: impl Into<String>) -> Value {
    json!({ "error": { "class": class, "desc": desc.into() } })
}

/// One request line → one answer.
async fn handle(line: &[u8], target: &Target) -> Value {
    let req: Value = match serde_json::from_slice(line) {
        Ok(v) => v,
        Err(e) => return error("GenericError", format!("not JSON: {e}")),
    };
    let id = req.get("id").cloned();
    let mut answer = match (
        req.get("execute").and_then(Value::as_str),
        req.get("arguments"),
    ) {
        (None, _) => error("GenericError", "expected {\"execute\": \"COMMAND\", ...}"),
        (Some(_), Some(a)) if !a.is_object() => {
            error("GenericError", "arguments must be an object")
        }
        (Some(cmd), args) => {
            let empty = json!({});
            execute(cmd, args.unwrap_or(&empty), target).await
        }
    };
    if let (Some(id), Some(obj)) = (id, answer.as_object_mut()) {
        obj.insert("id".into(), id);
    }
    answer
}

async fn execute(cmd: &str, args: &Value, target: &Target) -> Value {
    if cmd == "block_resize" {
        return answer(block_resize(args, target).await);
    }
    // Snapshot operations run on the current image, and a resize waits
    // for them.
    let image = target.live.enter().await;
    let arg = |k: &str| args.get(k).and_then(Value::as_str).map(str::to_string);
    let id_arg = || {
        args.get("id").and_then(|v| {
            v.as_str()
                .map(str::to_string)
                .or_else(|| v.as_u64().map(|n| n.to_string()))
        })
    };
    let r: std::result::Result<Value, String> = match cmd {
        "query-commands" => Ok(json!(COMMANDS)),
        "query-stats" => Ok((target.stats)()),
        "query-snapshots" => {
            let list: Vec<SnapshotJson> =
                image.snapshots().iter().map(SnapshotJson::from).collect();
            Ok(json!(list))
        }
        "snapshot-create" => match arg("name") {
            None => Err("snapshot-create needs {\"name\": NAME}".into()),
            Some(name) => image
                .create_snapshot(&name)
                .await
                .map(|s| json!(SnapshotJson::from(&s)))
                .map_err(|e| e.to_string()),
        },
        "snapshot-delete" => {
            let sel = match (id_arg(), arg("name")) {
                (Some(i), Some(n)) => Some(SnapshotSel::IdAndName(i, n)),
                (Some(i), None) => Some(SnapshotSel::Id(i)),
                (None, Some(n)) => Some(SnapshotSel::Name(n)),
                (None, None) => None,
            };
            match sel {
                None => Err("snapshot-delete needs {\"name\": NAME} or {\"id\": ID}".into()),
                Some(sel) => image
                    .delete_snapshot(&sel)
                    .await
                    .map(|s| json!(SnapshotJson::from(&s)))
                    .map_err(|e| e.to_string()),
            }
        }
        other => {
            return error(
                "CommandNotFound",
                format!("the command {other} has not been found"),
            );
        }
    };
    answer(r)
}

fn answer(r: std::result::Result<Value, String>) -> Value {
    match r {
        Ok(v) => json!({ "return": v }),
        Err(desc) => error("GenericError", desc),
    }
}

/// `block_resize`: check the arguments, resize, tell the server.
async fn block_resize(args: &Value, target: &Target) -> std::result::Result<Value, String> {
    let image = target.live.current();
    let Some(reopened) = &target.reopened else {
        return Err(format!(
            "{}: online resize is available for NBD exports only; stop the server to resize",
            image.describe()
        ));
    };
    let size = args
        .get("size")
        .and_then(Value::as_u64)
        .ok_or("block_resize needs {\"size\": BYTES}")?;
    let shrink = match args.get("shrink") {
        None => false,
        Some(v) => v.as_bool().ok_or("\"shrink\" must be true or false")?,
    };
    if let Some(file) = args.get("file") {
        let file = file.as_str().ok_or("\"file\" must be a path")?;
        same_file(file, &image.describe())?;
    }
    let done = target
        .live
        .resize(size, shrink, |now| reopened(now))
        .await
        .map_err(|e| e.to_string())?;
    Ok(json!({ "old-size": done.old_size, "new-size": done.new_size }))
}

/// Refuse a request meant for `asked` when the server exports `served`.
fn same_file(asked: &str, served: &str) -> std::result::Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let id = |p: &str| std::fs::metadata(p).map(|m| (m.dev(), m.ino()));
    match (id(asked), id(served)) {
        (Ok(a), Ok(b)) if a == b => Ok(()),
        (Err(e), _) => Err(format!("{asked}: {e}")),
        _ => Err(format!(
            "{asked}: the server exports {served}, not this image"
        )),
    }
}

/// Send one request to the control socket at `path`; its `return` value,
/// or its error as an error.
pub async fn request(path: &Path, cmd: &str, args: Value) -> Result<Value> {
    let sock = UnixStream::connect(path).await.map_err(|e| {
        anyhow!(
            "{}: cannot connect to the control socket: {e}",
            path.display()
        )
    })?;
    let (rd, mut wr) = sock.into_split();
    let req = json!({ "execute": cmd, "arguments": args });
    wr.write_all(format!("{req}\n").as_bytes())
        .await
        .map_err(|e| anyhow!("{}: {e}", path.display()))?;
    let mut line = String::new();
    BufReader::new(rd)
        .read_line(&mut line)
        .await
        .map_err(|e| anyhow!("{}: {e}", path.display()))?;
    let v: Value = serde_json::from_str(&line).map_err(|_| {
        anyhow!(
            "{}: the server closed the connection or sent no JSON",
            path.display()
        )
    })?;
    if let Some(r) = v.get("return") {
        return Ok(r.clone());
    }
    let desc = v
        .pointer("/error/desc")
        .and_then(Value::as_str)
        .unwrap_or("malformed answer");
    Err(anyhow!("{desc}"))
}
