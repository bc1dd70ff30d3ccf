//! Istio-shaped mutual TLS between the mini-mesh's sidecars: a throw-away CA and, per pod, a
//! certificate whose only name is its SPIFFE identity (`spiffe://cluster.local/ns/default/sa/<sa>`,
//! a critical URI SAN and an empty subject, like istiod's workload certificates), made with the
//! `openssl` command line. Test material only: the keys are world-readable so the uid-1337 Envoy
//! can read them, and the CA lives as long as its [`TestCa`].

use crate::process::TempDir;
use anyhow::{ensure, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Istio's trust domain.
pub const TRUST_DOMAIN: &str = "cluster.local";

/// What one sidecar needs for mTLS: its certificate chain and key, and the mesh's root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MtlsFiles {
    pub cert_chain: PathBuf,
    pub private_key: PathBuf,
    pub root_ca: PathBuf,
    /// The SPIFFE identity in the certificate.
    pub identity: String,
}

/// A root CA in a private directory (removed on drop) that issues workload certificates.
#[derive(Debug)]
pub struct TestCa {
    dir: TempDir,
    cert: PathBuf,
    key: PathBuf,
}

impl TestCa {
    pub fn new() -> Result<TestCa> {
        let dir = TempDir::new("ca")?;
        let (cert, key) = (
            dir.path().join("root-cert.pem"),
            dir.path().join("ca-key.pem"),
        );
        new_key_req(
            dir.path(),
            &[
                "-x509",
                "-keyout",
                "ca-key.pem",
                "-out",
                "root-cert.pem",
                "-days",
                "2",
                "-subj",
                "/O=cluster.local",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        )?;
        Ok(TestCa { dir, cert, key })
    }

    /// A workload certificate for service account `sa` in namespace `default`.
    pub fn issue(&self, sa: &str) -> Result<MtlsFiles> {
        ensure!(
            !sa.is_empty() && sa.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'),
            "service account name {sa:?}: letters, digits and '-' only"
        );
        let identity = format!("spiffe://{TRUST_DOMAIN}/ns/default/sa/{sa}");
        let ext = self.dir.write(
            &format!("{sa}.ext"),
            format!(
                "subjectAltName=critical,URI:{identity}\n\
                 extendedKeyUsage=serverAuth,clientAuth\n\
                 keyUsage=critical,digitalSignature,keyEncipherment\n\
                 basicConstraints=critical,CA:FALSE\n"
            )
            .as_bytes(),
        )?;
        let (key, csr, cert) = (
            format!("{sa}-key.pem"),
            format!("{sa}.csr"),
            format!("{sa}-cert.pem"),
        );
        new_key_req(
            self.dir.path(),
            &["-keyout", &key, "-out", &csr, "-subj", "/"],
        )?;
        openssl(
            self.dir.path(),
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                path_str(&self.cert)?,
                "-CAkey",
                path_str(&self.key)?,
                "-set_serial",
                &serial(),
                "-out",
                &cert,
                "-days",
                "2",
                "-extfile",
                path_str(&ext)?,
            ],
        )?;
        // Envoy runs as uid 1337; the directory is 0755.
        let private_key = self.dir.path().join(&key);
        set_mode(&private_key, 0o644)?;
        Ok(MtlsFiles {
            cert_chain: self.dir.path().join(&cert),
            private_key,
            root_ca: self.cert.clone(),
            identity,
        })
    }
}

/// `openssl req` with a new P-256 key (no passphrase) and `args`.
fn new_key_req(dir: &Path, args: &[&str]) -> Result<()> {
    let mut all = vec![
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    all.extend_from_slice(args);
    openssl(dir, &all)
}

fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .context("running openssl (scripts/setup.sh installs it)")?;
    ensure!(
        out.status.success(),
        "openssl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .with_context(|| format!("{} is not UTF-8", p.display()))
}

fn set_mode(p: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {mode:o} {}", p.display()))
}

/// A serial number no two certificates of one process share.
fn serial() -> String {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("0x{:x}{n:04x}", std::process::id())
}
