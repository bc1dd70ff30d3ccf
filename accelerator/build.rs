//! Builds the eBPF programs (ebpf/programs) for bpfel-unknown-none with aya-build, from source,
//! as part of the normal `cargo build`. Needs bpf-linker (installed by scripts/setup.sh).
use anyhow::{anyhow, Context as _};

/// The git revision this binary is built from, for `meshlane_build_info` and `--version`:
/// `MESHLANE_GIT_REVISION` when set (an image build has no `.git`), else `git rev-parse`, else
/// `unknown`.
fn revision(manifest: &std::path::Path) {
    println!("cargo:rerun-if-env-changed=MESHLANE_GIT_REVISION");
    let repo = manifest.parent().unwrap_or(manifest);
    let run = |args: &[&str]| {
        std::process::Command::new("git")
            .arg("-C")
            .arg(repo)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    // Asked of git rather than assumed to be `<repo>/.git`: in a worktree that is a file, HEAD
    // lives in the worktree's own git dir and the refs in the common one, and a rebuild that
    // watched neither would keep an older commit's revision.
    let dir = |flag: &str| {
        run(&["rev-parse", "--path-format=absolute", flag]).map(std::path::PathBuf::from)
    };
    for (flag, watched) in [
        ("--git-dir", "HEAD"),
        ("--git-common-dir", "refs"),
        ("--git-common-dir", "packed-refs"),
    ] {
        if let Some(path) = dir(flag).map(|d| d.join(watched)).filter(|p| p.exists()) {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
    let rev = std::env::var("MESHLANE_GIT_REVISION")
        .ok()
        .filter(|r| !r.trim().is_empty())
        .or_else(|| run(&["rev-parse", "--short=12", "HEAD"]))
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=MESHLANE_GIT_REVISION={rev}");
}

fn main() -> anyhow::Result<()> {
    // Read at run time, not with env!(): cargo reuses a compiled build script across checkouts
    // of the same workspace sharing a target directory (its hash has no absolute path), and a
    // path baked in at compile time then builds, and watches, another checkout's programs.
    let manifest = std::path::PathBuf::from(
        std::env::var("CARGO_MANIFEST_DIR").context("cargo sets CARGO_MANIFEST_DIR")?,
    );
    let root = manifest
        .parent()
        .context("accelerator/ has a parent")?
        .join("ebpf/programs");
    let root = root
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", root.display()))?;
    println!("cargo:rerun-if-changed={root}/../common/src");
    revision(&manifest);
    // The eBPF crate needs -Z build-std=core. RUSTC_BOOTSTRAP is set for that sub-build only:
    // aya-build reads it from this build script's environment and passes it to the child cargo.
    // SAFETY: build scripts are single-threaded at this point.
    unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    let toolchain = std::env::var("MESHLANE_EBPF_TOOLCHAIN").unwrap_or_else(|_| "1.95.0".into());
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "meshlane-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(&toolchain),
    )
}
