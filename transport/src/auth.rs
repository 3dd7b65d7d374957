//! Connection authentication: every connection of a cluster proves, before its first
//! frame, that both ends hold the cluster's secret (HMAC-SHA-256 challenge-response,
//! mutual, with fresh nonces on both sides).
//!
//! The accepting side speaks first, so a peer that has no secret learns at once why it
//! is refused instead of waiting for a timeout:
//!
//! 1. server → client, `Hello`: magic, the cluster id, the server's nonce;
//! 2. client → server, `Proof`: magic, the client's cluster id, the client's nonce and
//!    `HMAC(key, "dds client" | id | server nonce | client nonce)`;
//! 3. server → client, `Verdict`: magic, a code (0: accepted) and
//!    `HMAC(key, "dds server" | id | client nonce | server nonce)`, so the client knows
//!    it reached a member of its cluster too.
//!
//! A proof is bound to the server's nonce of that one connection: one captured from an
//! earlier connection and replayed on a new one fails. MACs are compared in constant
//! time (`Mac::verify_slice`). After the handshake frames flow unauthenticated and
//! unencrypted: this keeps strangers and other clusters out, it is not TLS against an
//! attacker who can rewrite packets on the path.

use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The first bytes of every handshake message (and never of a frame of any framing
/// this crate carries, so a peer that speaks frames to an authenticating one, or the
/// other way round, is told apart).
pub const MAGIC: [u8; 8] = *b"DDSAUTH1";
pub const HELLO_LEN: usize = 8 + 8 + 16;
pub const PROOF_LEN: usize = 8 + 8 + 16 + 32;
pub const VERDICT_LEN: usize = 8 + 1 + 32;

type Nonce = [u8; 16];

/// The cluster's identity and shared key. `Debug` never shows the key, and nothing
/// compares keys but the MACs' constant-time checks.
#[derive(Clone)]
pub struct Secret {
    cluster_id: u64,
    key: [u8; 32],
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret {{ cluster {:016x}, key hidden }}", self.cluster_id)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("the peer requires the cluster's secret and this process has none (give it --secret-file)")]
    NoSecret,
    #[error("the peer belongs to cluster {theirs:016x}, not to this cluster {ours:016x}")]
    OtherCluster { ours: u64, theirs: u64 },
    #[error("wrong secret: the proof does not match cluster {cluster:016x}'s key")]
    WrongSecret { cluster: u64 },
    #[error("refused by the peer: {0}")]
    RefusedByPeer(&'static str),
    #[error("the peer could not prove it holds cluster {cluster:016x}'s key")]
    PeerUnproven { cluster: u64 },
    #[error("it sent {0} before authenticating (a process without the cluster's secret?)")]
    NotAuthenticated(&'static str),
    #[error("no handshake within {} s: the peer sent nothing (does it run without the cluster's secret?)", HANDSHAKE_TIMEOUT.as_secs())]
    Silent,
    #[error("handshake: {0}")]
    Io(#[source] std::io::Error),
    #[error("draw a nonce: {0}")]
    Random(String),
    #[error("secret file {path}: {why}")]
    File { path: String, why: String },
}

impl AuthError {
    /// A verdict on the credentials (not a timeout or a broken connection).
    pub fn is_refusal(&self) -> bool {
        !matches!(self, AuthError::Silent | AuthError::Io(_) | AuthError::Random(_) | AuthError::File { .. })
    }

    fn code(&self) -> u8 {
        match self {
            AuthError::OtherCluster { .. } => 2,
            AuthError::WrongSecret { .. } => 1,
            _ => 3,
        }
    }
}

fn refused_for(code: u8) -> &'static str {
    match code {
        1 => "wrong secret",
        2 => "this process belongs to another cluster",
        _ => "malformed proof",
    }
}

/// Whether `bytes` open with a handshake message: `Some(false)` as soon as they cannot,
/// `None` while too few bytes are there to tell.
pub fn opens_with_magic(bytes: &[u8]) -> Option<bool> {
    let prefix = bytes.len().min(MAGIC.len());
    if bytes[..prefix] != MAGIC[..prefix] {
        return Some(false);
    }
    (prefix == MAGIC.len()).then_some(true)
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `len` bytes written as `2 * len` hex digits.
fn from_hex(s: &str, len: usize) -> Result<Vec<u8>, String> {
    if s.len() != 2 * len || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("{s:?} is not {len} bytes in hex"));
    }
    Ok((0..len).map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).expect("hex digits")).collect())
}

fn nonce() -> Result<Nonce, AuthError> {
    let mut n = [0u8; 16];
    getrandom::fill(&mut n).map_err(|e| AuthError::Random(e.to_string()))?;
    Ok(n)
}

impl Secret {
    /// A new cluster's secret: a random id and key.
    pub fn generate() -> Result<Secret, AuthError> {
        let mut bytes = [0u8; 40];
        getrandom::fill(&mut bytes).map_err(|e| AuthError::Random(e.to_string()))?;
        let cluster_id = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
        Ok(Secret { cluster_id, key: bytes[8..].try_into().expect("32 bytes") })
    }

    pub fn cluster_id(&self) -> u64 {
        self.cluster_id
    }

    /// The file's text: `cluster = "<16 hex>"` and `key = "<64 hex>"` (TOML).
    pub fn to_text(&self) -> String {
        format!("# The dds cluster secret: every process of the cluster needs it. Keep it private.\ncluster = \"{:016x}\"\nkey = \"{}\"\n", self.cluster_id, to_hex(&self.key))
    }

    pub fn parse(text: &str) -> Result<Secret, String> {
        let field = |name: &str| {
            text.lines()
                .filter_map(|l| l.split_once('='))
                .find(|(k, _)| k.trim() == name)
                .map(|(_, v)| v.trim().trim_matches('"').to_string())
                .ok_or(format!("no `{name} = \"...\"` line"))
        };
        let id = from_hex(&field("cluster")?, 8).map_err(|e| format!("cluster: {e}"))?;
        let key = from_hex(&field("key")?, 32).map_err(|e| format!("key: {e}"))?;
        Ok(Secret { cluster_id: u64::from_be_bytes(id.try_into().expect("8 bytes")), key: key.try_into().expect("32 bytes") })
    }

    /// Reads a secret file, refusing one that others than its owner may read.
    pub fn load(path: &Path) -> Result<Secret, AuthError> {
        use std::os::unix::fs::PermissionsExt;
        let err = |why: String| AuthError::File { path: path.display().to_string(), why };
        let mode = std::fs::metadata(path).map_err(|e| err(e.to_string()))?.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(err(format!("readable by others (mode {:o}); `chmod 600 {}`", mode & 0o777, path.display())));
        }
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        Secret::parse(&text).map_err(err)
    }

    /// Writes a new secret file, mode 0600, durably; an existing file is never replaced.
    pub fn create(path: &Path) -> Result<Secret, AuthError> {
        use std::os::unix::fs::OpenOptionsExt;
        let err = |why: String| AuthError::File { path: path.display().to_string(), why };
        let secret = Secret::generate()?;
        let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => err("exists already; a secret file is never replaced (remove it to make a new one)".into()),
            _ => err(e.to_string()),
        })?;
        file.write_all(secret.to_text().as_bytes()).and_then(|()| file.sync_all()).map_err(|e| err(e.to_string()))?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| err(format!("sync its directory: {e}")))?;
        }
        Ok(secret)
    }

    /// The bearer token a metrics scrape presents (`Authorization: Bearer ...`): derived
    /// from the key, so it proves nothing beyond the metrics and reveals nothing of it.
    pub fn metrics_token(&self) -> String {
        to_hex(&self.metrics_mac().finalize().into_bytes())
    }

    /// Whether `given` is the metrics token, compared in constant time.
    pub fn is_metrics_token(&self, given: &str) -> bool {
        from_hex(given.trim(), 32).is_ok_and(|bytes| self.metrics_mac().verify_slice(&bytes).is_ok())
    }

    fn metrics_mac(&self) -> Hmac<Sha256> {
        self.mac(b"dds metrics", &[0; 16], &[0; 16])
    }

    /// This cluster's id with another key: what a wrong secret of this cluster is (for
    /// tests that must be refused with one).
    pub fn with_key(&self, key: [u8; 32]) -> Secret {
        Secret { cluster_id: self.cluster_id, key }
    }

    fn mac(&self, label: &[u8], first: &Nonce, second: &Nonce) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes a key of any length");
        mac.update(label);
        mac.update(&self.cluster_id.to_le_bytes());
        mac.update(first);
        mac.update(second);
        mac
    }
}

/// The accepting side of one connection, between its `Hello` and the client's `Proof`.
#[derive(Debug)]
pub struct ServerHandshake {
    nonce: Nonce,
}

impl ServerHandshake {
    /// Starts a handshake; `hello` is what to send first.
    pub fn start(secret: &Secret, hello: &mut Vec<u8>) -> Result<ServerHandshake, AuthError> {
        let nonce = nonce()?;
        hello.extend_from_slice(&MAGIC);
        hello.extend_from_slice(&secret.cluster_id.to_le_bytes());
        hello.extend_from_slice(&nonce);
        Ok(ServerHandshake { nonce })
    }

    /// Looks at what the client sent so far: `Ok(None)` until a whole proof is there;
    /// `Ok(Some(n))`: accepted, the first `n` bytes were the proof and `verdict` holds
    /// the answer to send. `Err`: refused; `verdict` holds the refusal to send, best
    /// effort, before the connection closes.
    pub fn on_bytes(&self, secret: &Secret, input: &[u8], verdict: &mut Vec<u8>) -> Result<Option<usize>, AuthError> {
        let theirs = input.get(8..16).map_or(0, |id| u64::from_le_bytes(id.try_into().expect("8 bytes")));
        let client_nonce: Nonce = input.get(16..32).map_or([0; 16], |n| n.try_into().expect("16 bytes"));
        let checked = if opens_with_magic(input) == Some(false) {
            Err(AuthError::NotAuthenticated("a frame"))
        } else if input.len() < PROOF_LEN {
            return Ok(None);
        } else if theirs != secret.cluster_id {
            Err(AuthError::OtherCluster { ours: secret.cluster_id, theirs })
        } else {
            secret.mac(b"dds client", &self.nonce, &client_nonce).verify_slice(&input[32..PROOF_LEN]).map_err(|_| AuthError::WrongSecret { cluster: secret.cluster_id })
        };
        verdict.extend_from_slice(&MAGIC);
        match checked {
            Ok(()) => {
                verdict.push(0);
                verdict.extend_from_slice(&secret.mac(b"dds server", &client_nonce, &self.nonce).finalize().into_bytes());
                Ok(Some(PROOF_LEN))
            }
            Err(e) => {
                verdict.push(e.code());
                verdict.extend_from_slice(&[0; 32]);
                Err(e)
            }
        }
    }
}

/// The connecting side: answers a `Hello` with a proof, then checks the verdict.
#[derive(Debug)]
pub struct ClientHandshake {
    server_nonce: Nonce,
    nonce: Nonce,
}

impl ClientHandshake {
    /// `hello`: the server's first `HELLO_LEN` bytes; `proof` gets what to send back.
    pub fn on_hello(secret: &Secret, hello: &[u8], proof: &mut Vec<u8>) -> Result<ClientHandshake, AuthError> {
        if hello.len() < HELLO_LEN || hello[..8] != MAGIC {
            return Err(AuthError::PeerUnproven { cluster: secret.cluster_id });
        }
        let theirs = u64::from_le_bytes(hello[8..16].try_into().expect("8 bytes"));
        let server_nonce: Nonce = hello[16..32].try_into().expect("16 bytes");
        let nonce = nonce()?;
        proof.extend_from_slice(&MAGIC);
        proof.extend_from_slice(&secret.cluster_id.to_le_bytes());
        proof.extend_from_slice(&nonce);
        proof.extend_from_slice(&secret.mac(b"dds client", &server_nonce, &nonce).finalize().into_bytes());
        if theirs != secret.cluster_id {
            // The proof still goes, so the server logs why too.
            return Err(AuthError::OtherCluster { ours: secret.cluster_id, theirs });
        }
        Ok(ClientHandshake { server_nonce, nonce })
    }

    pub fn on_verdict(&self, secret: &Secret, verdict: &[u8]) -> Result<(), AuthError> {
        if verdict.len() < VERDICT_LEN || verdict[..8] != MAGIC {
            return Err(AuthError::PeerUnproven { cluster: secret.cluster_id });
        }
        if verdict[8] != 0 {
            return Err(AuthError::RefusedByPeer(refused_for(verdict[8])));
        }
        secret.mac(b"dds server", &self.nonce, &self.server_nonce).verify_slice(&verdict[9..VERDICT_LEN]).map_err(|_| AuthError::PeerUnproven { cluster: secret.cluster_id })
    }
}

/// The whole connecting side on a blocking stream, each read and write within the
/// stream's own timeouts. Without a secret, nothing is exchanged.
pub fn client_handshake<S: Read + Write>(stream: &mut S, secret: Option<&Secret>) -> Result<(), AuthError> {
    let Some(secret) = secret else { return Ok(()) };
    let mut hello = [0u8; HELLO_LEN];
    stream.read_exact(&mut hello).map_err(|e| match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => AuthError::Silent,
        _ => AuthError::Io(e),
    })?;
    let mut proof = Vec::with_capacity(PROOF_LEN);
    let handshake = ClientHandshake::on_hello(secret, &hello, &mut proof);
    stream.write_all(&proof).map_err(AuthError::Io)?;
    let handshake = handshake?;
    let mut verdict = [0u8; VERDICT_LEN];
    stream.read_exact(&mut verdict).map_err(AuthError::Io)?;
    handshake.on_verdict(secret, &verdict)
}

/// The whole accepting side on a blocking socket, within `HANDSHAKE_TIMEOUT` in all
/// (not per read: a peer that trickles its proof a byte at a time is cut off too).
/// Without a secret, nothing is exchanged. The socket's timeouts are left cleared.
pub fn server_handshake(stream: &mut std::net::TcpStream, secret: Option<&Secret>) -> Result<(), AuthError> {
    let Some(secret) = secret else { return Ok(()) };
    let deadline = std::time::Instant::now() + HANDSHAKE_TIMEOUT;
    let left = || deadline.checked_duration_since(std::time::Instant::now()).filter(|d| !d.is_zero()).ok_or(AuthError::Silent);
    stream.set_write_timeout(Some(HANDSHAKE_TIMEOUT)).map_err(AuthError::Io)?;
    let mut hello = Vec::with_capacity(HELLO_LEN);
    let handshake = ServerHandshake::start(secret, &mut hello)?;
    stream.write_all(&hello).map_err(AuthError::Io)?;
    let mut input = Vec::with_capacity(PROOF_LEN);
    let mut verdict = Vec::with_capacity(VERDICT_LEN);
    let result = loop {
        let mut chunk = [0u8; PROOF_LEN];
        let want = PROOF_LEN - input.len();
        stream.set_read_timeout(Some(left()?)).map_err(AuthError::Io)?;
        let n = match stream.read(&mut chunk[..want]) {
            Ok(n) => n,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => break Err(AuthError::Silent),
            Err(e) => break Err(AuthError::Io(e)),
        };
        if n == 0 {
            break Err(AuthError::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
        input.extend_from_slice(&chunk[..n]);
        match handshake.on_bytes(secret, &input, &mut verdict) {
            Ok(None) => continue,
            Ok(Some(_)) => break stream.write_all(&verdict).map_err(AuthError::Io),
            Err(e) => {
                let _ = stream.write_all(&verdict);
                break Err(e);
            }
        }
    };
    stream.set_read_timeout(None).and_then(|()| stream.set_write_timeout(None)).map_err(AuthError::Io)?;
    result
}

/// How long a blocking handshake may take at most, whatever the caller's timeout.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);

#[cfg(test)]
mod tests {
    use super::*;

    fn exchange(server: &Secret, client: &Secret) -> (Result<Option<usize>, AuthError>, Result<(), AuthError>) {
        let mut hello = Vec::new();
        let s = ServerHandshake::start(server, &mut hello).unwrap();
        let mut proof = Vec::new();
        let c = ClientHandshake::on_hello(client, &hello, &mut proof);
        let mut verdict = Vec::new();
        let accepted = s.on_bytes(server, &proof, &mut verdict);
        let checked = c.and_then(|c| c.on_verdict(client, &verdict));
        (accepted, checked)
    }

    #[test]
    fn the_same_secret_is_accepted_both_ways() {
        let secret = Secret::generate().unwrap();
        let (accepted, checked) = exchange(&secret, &secret);
        assert_eq!(accepted.unwrap(), Some(PROOF_LEN));
        checked.unwrap();
    }

    #[test]
    fn a_wrong_key_or_another_cluster_is_refused_on_both_sides() {
        let ours = Secret::generate().unwrap();
        let wrong_key = ours.with_key([7; 32]);
        let (accepted, checked) = exchange(&ours, &wrong_key);
        assert!(matches!(accepted, Err(AuthError::WrongSecret { .. })));
        assert!(matches!(checked, Err(AuthError::RefusedByPeer("wrong secret"))), "{checked:?}");
        let other = Secret::generate().unwrap();
        let (accepted, checked) = exchange(&ours, &other);
        assert!(matches!(accepted, Err(AuthError::OtherCluster { .. })));
        assert!(matches!(checked, Err(AuthError::OtherCluster { .. })));
    }

    #[test]
    fn a_proof_replayed_on_a_new_connection_is_refused() {
        let secret = Secret::generate().unwrap();
        let mut hello = Vec::new();
        ServerHandshake::start(&secret, &mut hello).unwrap();
        let mut captured = Vec::new();
        ClientHandshake::on_hello(&secret, &hello, &mut captured).unwrap();
        let mut fresh = Vec::new();
        let second = ServerHandshake::start(&secret, &mut fresh).unwrap();
        assert!(matches!(second.on_bytes(&secret, &captured, &mut Vec::new()), Err(AuthError::WrongSecret { .. })));
    }

    #[test]
    fn a_frame_instead_of_a_proof_is_refused_at_its_first_byte() {
        let secret = Secret::generate().unwrap();
        let s = ServerHandshake::start(&secret, &mut Vec::new()).unwrap();
        assert!(s.on_bytes(&secret, b"DDS", &mut Vec::new()).unwrap().is_none());
        assert!(matches!(s.on_bytes(&secret, b"\x01\x00", &mut Vec::new()), Err(AuthError::NotAuthenticated(_))));
    }

    #[test]
    fn secret_files_round_trip_and_a_bad_one_says_why() {
        let secret = Secret::generate().unwrap();
        assert_eq!(Secret::parse(&secret.to_text()).unwrap().to_text(), secret.to_text());
        assert!(Secret::parse("cluster = \"12\"\nkey = \"00\"").unwrap_err().contains("cluster"));
        assert!(!format!("{secret:?}").contains(&secret.to_text()[100..110]));
        assert!(secret.is_metrics_token(&secret.metrics_token()));
        assert!(!secret.is_metrics_token(&Secret::generate().unwrap().metrics_token()));
        assert!(!secret.is_metrics_token("not a token"));
    }
}
