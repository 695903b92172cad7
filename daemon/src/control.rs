//! A daemon's control socket: operator requests on a Unix socket only the daemon's user
//! can open (mode 0600), never on a network port. One JSON request per line, one JSON
//! answer per line; each daemon defines its requests and answers, this module carries
//! them.
//!
//! Bounded: at most [`ControlLimits::max_clients`] connections at once (more are closed
//! at once), [`ControlLimits::max_line`] bytes per request, and a time limit per
//! connection. A request that does not parse gets the handler's answer to the parse
//! error, never a dropped connection.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;

/// How much one control socket serves.
#[derive(Debug, Clone, Copy)]
pub struct ControlLimits {
    pub max_clients: usize,
    pub max_line: usize,
    /// How long one connection may take, request and answer.
    pub timeout: Duration,
}

/// Longest answer a client reads.
const MAX_ANSWER: u64 = 1 << 20;

/// Binds the control socket at `path` (replacing a stale one, mode 0600) and serves it:
/// each request line is parsed as `Req` and given to `handler` (`Err` with the reason
/// when it is too long or does not parse); its answer is written back as one line.
pub fn serve<Req, Resp, H, Fut>(
    path: &Path,
    limits: ControlLimits,
    handler: H,
) -> std::io::Result<tokio::task::JoinHandle<()>>
where
    Req: DeserializeOwned + Send + 'static,
    Resp: Serialize + Send + 'static,
    H: Fn(Result<Req, String>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Resp> + Send + 'static,
{
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if std::fs::symlink_metadata(path).is_ok() {
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    tracing::info!(socket = %path.display(), "control socket listening");
    let slots = Arc::new(Semaphore::new(limits.max_clients));
    let handler = Arc::new(handler);
    Ok(tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                drop(stream); // too many at once: the client sees the connection close
                continue;
            };
            let handler = handler.clone();
            tokio::spawn(async move {
                let one = serve_one::<Req, Resp, H, Fut>(stream, limits.max_line, &*handler);
                let _ = tokio::time::timeout(limits.timeout, one).await;
                drop(permit);
            });
        }
    }))
}

async fn serve_one<Req, Resp, H, Fut>(
    stream: UnixStream,
    max_line: usize,
    handler: &H,
) -> std::io::Result<()>
where
    Req: DeserializeOwned,
    Resp: Serialize,
    H: Fn(Result<Req, String>) -> Fut,
    Fut: Future<Output = Resp>,
{
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let n = BufReader::new(read.take(max_line as u64 + 1))
        .read_line(&mut line)
        .await?;
    let request = if n > max_line {
        Err(format!("request longer than {max_line} bytes"))
    } else {
        serde_json::from_str::<Req>(line.trim()).map_err(|e| format!("bad request: {e}"))
    };
    let response = handler(request).await;
    let mut out = serde_json::to_vec(&response).unwrap_or_default();
    out.push(b'\n');
    write.write_all(&out).await
}

/// Sends `request` to the daemon (`daemon`, for messages) whose control socket is
/// `path`, and reads its answer (the CLI's side).
pub async fn request<Req: Serialize, Resp: DeserializeOwned>(
    path: &Path,
    daemon: &str,
    request: &Req,
) -> Result<Resp, String> {
    let stream = UnixStream::connect(path)
        .await
        .map_err(|e| format!("{}: {e} (is the {daemon} running?)", path.display()))?;
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_vec(request).map_err(|e| e.to_string())?;
    line.push(b'\n');
    write.write_all(&line).await.map_err(|e| e.to_string())?;
    let mut answer = String::new();
    BufReader::new(read.take(MAX_ANSWER))
        .read_line(&mut answer)
        .await
        .map_err(|e| e.to_string())?;
    if answer.is_empty() {
        return Err(format!(
            "{}: the {daemon} closed the connection without an answer (busy, or the request took too long)",
            path.display()
        ));
    }
    serde_json::from_str(answer.trim()).map_err(|e| format!("bad answer {answer:?}: {e}"))
}
