//! Records the git revision the binary was built from (`tidepool --version`,
//! `tidepool_build_info`). Builds outside a git checkout (a container build context without
//! `.git`) say `unknown`; `TIDEPOOL_REVISION` in the environment overrides both.

fn main() {
    println!("cargo:rerun-if-env-changed=TIDEPOOL_REVISION");
    println!("cargo:rerun-if-changed=../.git/HEAD");
    println!("cargo:rerun-if-changed=../.git/refs");
    let rev = std::env::var("TIDEPOOL_REVISION").ok().or_else(|| {
        std::process::Command::new("git")
            .args(["rev-parse", "--short=12", "HEAD"])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    });
    println!(
        "cargo:rustc-env=TIDEPOOL_REVISION={}",
        rev.filter(|r| !r.is_empty())
            .unwrap_or_else(|| "unknown".into())
    );
}
