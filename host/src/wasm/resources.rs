//! The host types behind the `wasi:keyvalue` resources a guest holds: an
//! open store ([`Bucket`]) and a compare-and-swap in progress ([`Cas`]).
//! Their host functions are in `host::keyvalue`.

use std::sync::Arc;

use crate::store::Store;

/// An open store: the `bucket` resource.
pub struct Bucket {
    pub(in crate::wasm) store: Arc<Store>,
}

/// A compare-and-swap in progress: the `cas` resource, holding the value
/// it read.
pub struct Cas {
    pub(in crate::wasm) store: Arc<Store>,
    pub(in crate::wasm) key: String,
    pub(in crate::wasm) current: Option<Vec<u8>>,
}
