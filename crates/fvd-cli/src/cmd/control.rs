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
//! * `query-stats` → the statistics object of `--stats-socket`.
//!
//! Later operations on a running image (resize, …) are further commands
//! of the same shape.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Result, anyhow};
use fvd_core::Image;
use fvd_core::image::snapshot::SnapshotSel;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::cmd::snapshot::SnapshotJson;

/// Longest request line.
const MAX_LINE: usize = 64 << 10;

/// Every command, for `query-commands`.
const COMMANDS: [&str; 5] = [
    "query-commands",
    "query-snapshots",
    "query-stats",
    "snapshot-create",
    "snapshot-delete",
];

/// What answers `query-stats`.
pub type StatsFn = Arc<dyn Fn() -> Value + Send + Sync>;

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

/// Listen on `path` and serve requests about `image` until dropped.
pub fn start(image: Arc<Image>, path: &Path, stats: StatsFn) -> Result<ControlSocket> {
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
            let (img, stats) = (image.clone(), stats.clone());
            tokio::spawn(async move {
                let _ = serve_connection(sock, img, stats).await;
            });
        }
    });
    Ok(ControlSocket {
        path: path.to_path_buf(),
        task,
    })
}

async fn serve_connection(sock: UnixStream, image: Arc<Image>, stats: StatsFn) -> Result<()> {
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
        let answer = handle(&line, &image, &stats).await;
        wr.write_all(format!("{answer}\n").as_bytes()).await?;
    }
}

fn error(class: &str, desc: impl Into<String>) -> Value {
    json!({ "error": { "class": class, "desc": desc.into() } })
}

/// One request line → one answer.
async fn handle(line: &[u8], image: &Image, stats: &StatsFn) -> Value {
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
            execute(cmd, args.unwrap_or(&empty), image, stats).await
        }
    };
    if let (Some(id), Some(obj)) = (id, answer.as_object_mut()) {
        obj.insert("id".into(), id);
    }
    answer
}

async fn execute(cmd: &str, args: &Value, image: &Image, stats: &StatsFn) -> Value {
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
        "query-stats" => Ok(stats()),
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
    match r {
        Ok(v) => json!({ "return": v }),
        Err(desc) => error("GenericError", desc),
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
