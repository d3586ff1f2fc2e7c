//! Links the compression libraries Debian's static `librocksdb.a` needs.
//!
//! `.cargo/config.toml` links that archive (`ROCKSDB_STATIC`), not the shared
//! `librocksdb.so`: its thread-local counters are then read directly, not through
//! `__tls_get_addr` on every key comparison (docs/BENCHMARKS.md). The archive does not
//! say what it needs, so the libraries the shared one is linked against are named here.
fn main() {
    println!("cargo:rerun-if-env-changed=ROCKSDB_STATIC");
    if std::env::var_os("ROCKSDB_STATIC").is_some() {
        for lib in ["snappy", "lz4", "zstd", "bz2", "z"] {
            println!("cargo:rustc-link-lib=dylib={lib}");
        }
    }
}
