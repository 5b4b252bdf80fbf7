//! Link-time settings for the `kensa` binary:
//! - rpaths to libtorch's `lib/`: first `$ORIGIN/../lib/torch/lib` (where scripts/install.sh
//!   puts it beside an installed binary), then the build's own (`KENSA_TORCH_LIB`, set by
//!   scripts/env.sh), so the binary runs without LD_LIBRARY_PATH in either place;
//! - `libtorch_cuda.so` kept as a dependency even though no symbol of it is referenced
//!   (`--no-as-needed`): without it, CUDA is silently unavailable.
fn main() {
    println!("cargo:rerun-if-env-changed=KENSA_TORCH_LIB");
    let Ok(lib) = std::env::var("KENSA_TORCH_LIB") else { return };
    let dir = std::path::Path::new(&lib);
    if !dir.is_dir() {
        return;
    }
    println!("cargo:rustc-link-arg-bins=-Wl,-rpath,$ORIGIN/../lib/torch/lib");
    println!("cargo:rustc-link-arg-bins=-Wl,-rpath,{lib}");
    if dir.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg-bins=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg-bins=-L{lib}");
        println!("cargo:rustc-link-arg-bins=-ltorch_cuda");
        println!("cargo:rustc-link-arg-bins=-Wl,--as-needed");
    }
}
