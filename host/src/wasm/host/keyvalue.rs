//! `wasi:keyvalue@0.2.0-draft2` (`store`, `atomics`, `batch`) and the
//! host's `orchestrator:pipeline/expiring`: a stage's view of the stores
//! it is granted.
//!
//! `store.open(name)` answers `access-denied` unless the stage's
//! `capabilities.stores` names the store, so a plugin reaches only what
//! its configuration grants. Every operation is bounded by the store's
//! `timeout_ms` and by the current call's deadline, whichever comes first:
//! a store that is down costs a call at most that, never a hang.

use std::sync::Arc;
use std::time::Duration;

use wasmtime::component::Resource;

use super::state::HostState;
use crate::store::{
    Counter, Held, Holds, Lookup, MAX_BATCH_REPLY_BYTES, Store, StoreError, Window,
};
use crate::wasm::bindings::keyvalue::wasi::keyvalue::{atomics, batch, store};
use crate::wasm::bindings::v2::orchestrator::pipeline::expiring;
use crate::wasm::resources::{Bucket, Cas};

/// Most store and compare-and-swap handles one instance may hold at once.
pub const MAX_STORE_HANDLES: usize = 64;

fn too_many_handles() -> store::Error {
    store::Error::Other(format!(
        "at most {MAX_STORE_HANDLES} store handles may be open at once; drop some"
    ))
}

fn error(error: StoreError) -> store::Error {
    store::Error::Other(error.to_string())
}

impl HostState {
    /// The store behind `bucket`, for one operation: the current request
    /// is held against a cut until the returned value is dropped (see
    /// [`Holds`]).
    fn bucket(&self, bucket: &Resource<Bucket>) -> wasmtime::Result<Operating> {
        Ok(self.operating(self.table.get(bucket)?.store.clone()))
    }

    fn operating(&self, store: Arc<Store>) -> Operating {
        Operating {
            store,
            held: self.holds.as_ref().map(Holds::hold),
        }
    }

    /// `operation` changed its store (or may have: it failed): the
    /// request stays held until the current call returns, so the stage
    /// gets to act on what it did.
    fn changed(&mut self, operation: Operating) {
        if self.changed_store.is_none() {
            self.changed_store = operation.held;
        }
    }
}

/// A store with one operation under way (see [`Holds`]).
struct Operating {
    store: Arc<Store>,
    held: Option<Held>,
}

impl std::ops::Deref for Operating {
    type Target = Store;

    fn deref(&self) -> &Store {
        &self.store
    }
}

impl store::Host for HostState {
    async fn open(
        &mut self,
        identifier: String,
    ) -> wasmtime::Result<Result<Resource<Bucket>, store::Error>> {
        if !self.granted_stores.contains(&identifier) {
            return Ok(Err(store::Error::AccessDenied));
        }
        let Some(store) = self.stores.get(&identifier).cloned() else {
            return Ok(Err(store::Error::NoSuchStore));
        };
        if self.store_handles >= MAX_STORE_HANDLES {
            return Ok(Err(too_many_handles()));
        }
        let bucket = self.table.push(Bucket { store })?;
        self.store_handles += 1;
        Ok(Ok(bucket))
    }
}

impl store::HostBucket for HostState {
    async fn get(
        &mut self,
        bucket: Resource<Bucket>,
        key: String,
    ) -> wasmtime::Result<Result<Option<Vec<u8>>, store::Error>> {
        let store = self.bucket(&bucket)?;
        Ok(store.get(&key, self.deadline).await.map_err(error))
    }

    async fn set(
        &mut self,
        bucket: Resource<Bucket>,
        key: String,
        value: Vec<u8>,
    ) -> wasmtime::Result<Result<(), store::Error>> {
        let store = self.bucket(&bucket)?;
        let result = store.set(&key, &value, None, self.deadline).await;
        self.changed(store);
        Ok(result.map_err(error))
    }

    async fn delete(
        &mut self,
        bucket: Resource<Bucket>,
        key: String,
    ) -> wasmtime::Result<Result<(), store::Error>> {
        let store = self.bucket(&bucket)?;
        let result = store.delete(&[key], self.deadline).await;
        self.changed(store);
        Ok(result.map_err(error))
    }

    async fn exists(
        &mut self,
        bucket: Resource<Bucket>,
        key: String,
    ) -> wasmtime::Result<Result<bool, store::Error>> {
        let store = self.bucket(&bucket)?;
        Ok(store.exists(&key, self.deadline).await.map_err(error))
    }

    async fn list_keys(
        &mut self,
        bucket: Resource<Bucket>,
        cursor: Option<String>,
    ) -> wasmtime::Result<Result<store::KeyResponse, store::Error>> {
        let store = self.bucket(&bucket)?;
        Ok(store
            .list_keys(cursor.as_deref(), self.deadline)
            .await
            .map(|(keys, cursor)| store::KeyResponse { keys, cursor })
            .map_err(error))
    }

    async fn drop(&mut self, bucket: Resource<Bucket>) -> wasmtime::Result<()> {
        self.table.delete(bucket)?;
        self.store_handles = self.store_handles.saturating_sub(1);
        Ok(())
    }
}

impl atomics::Host for HostState {
    async fn increment(
        &mut self,
        bucket: Resource<Bucket>,
        key: String,
        delta: i64,
    ) -> wasmtime::Result<Result<i64, store::Error>> {
        let store = self.bucket(&bucket)?;
        let result = store.increment(&key, delta, self.deadline).await;
        self.changed(store);
        Ok(result.map_err(error))
    }

    async fn swap(
        &mut self,
        cas: Resource<Cas>,
        value: Vec<u8>,
    ) -> wasmtime::Result<Result<(), atomics::CasError>> {
        let cas = self.table.delete(cas)?;
        self.store_handles = self.store_handles.saturating_sub(1);
        let store = self.operating(cas.store.clone());
        let swapped = store
            .swap_if(&cas.key, cas.current.as_deref(), &value, self.deadline)
            .await;
        if !matches!(swapped, Ok(false)) {
            self.changed(store);
        }
        Ok(match swapped {
            Ok(true) => Ok(()),
            Ok(false) => {
                // Hand back a fresh `cas` holding the value that won.
                let current = cas.store.get(&cas.key, self.deadline).await;
                match current {
                    Ok(current) => {
                        let cas = self.table.push(Cas { current, ..cas })?;
                        self.store_handles += 1;
                        Err(atomics::CasError::CasFailed(cas))
                    }
                    Err(e) => Err(atomics::CasError::StoreError(error(e))),
                }
            }
            Err(e) => Err(atomics::CasError::StoreError(error(e))),
        })
    }
}

impl atomics::HostCas for HostState {
    async fn new(
        &mut self,
        bucket: Resource<Bucket>,
        key: String,
    ) -> wasmtime::Result<Result<Resource<Cas>, store::Error>> {
        let store = self.bucket(&bucket)?;
        if self.store_handles >= MAX_STORE_HANDLES {
            return Ok(Err(too_many_handles()));
        }
        let current = match store.get(&key, self.deadline).await {
            Ok(current) => current,
            Err(e) => return Ok(Err(error(e))),
        };
        let cas = self.table.push(Cas {
            store: store.store.clone(),
            key,
            current,
        })?;
        self.store_handles += 1;
        Ok(Ok(cas))
    }

    async fn current(
        &mut self,
        cas: Resource<Cas>,
    ) -> wasmtime::Result<Result<Option<Vec<u8>>, store::Error>> {
        Ok(Ok(self.table.get(&cas)?.current.clone()))
    }

    async fn drop(&mut self, cas: Resource<Cas>) -> wasmtime::Result<()> {
        self.table.delete(cas)?;
        self.store_handles = self.store_handles.saturating_sub(1);
        Ok(())
    }
}

impl batch::Host for HostState {
    async fn get_many(
        &mut self,
        bucket: Resource<Bucket>,
        keys: Vec<String>,
    ) -> wasmtime::Result<Result<Vec<Option<(String, Vec<u8>)>>, store::Error>> {
        let store = self.bucket(&bucket)?;
        let values = match store.get_many(&keys, self.deadline).await {
            Ok(values) => values,
            Err(e) => return Ok(Err(error(e))),
        };
        let bytes: usize = values.iter().flatten().map(Vec::len).sum();
        if bytes > MAX_BATCH_REPLY_BYTES {
            return Ok(Err(store::Error::Other(format!(
                "get-many would return {bytes} bytes; at most {MAX_BATCH_REPLY_BYTES}"
            ))));
        }
        Ok(Ok(keys
            .into_iter()
            .zip(values)
            .map(|(key, value)| value.map(|v| (key, v)))
            .collect()))
    }

    async fn set_many(
        &mut self,
        bucket: Resource<Bucket>,
        key_values: Vec<(String, Vec<u8>)>,
    ) -> wasmtime::Result<Result<(), store::Error>> {
        let store = self.bucket(&bucket)?;
        let result = store.set_many(&key_values, self.deadline).await;
        self.changed(store);
        Ok(result.map_err(error))
    }

    async fn delete_many(
        &mut self,
        bucket: Resource<Bucket>,
        keys: Vec<String>,
    ) -> wasmtime::Result<Result<(), store::Error>> {
        let store = self.bucket(&bucket)?;
        let result = store.delete(&keys, self.deadline).await;
        self.changed(store);
        Ok(result.map_err(error))
    }
}

impl expiring::Host for HostState {
    async fn set(
        &mut self,
        bucket: Resource<Bucket>,
        key: String,
        value: Vec<u8>,
        ttl_ms: u64,
    ) -> wasmtime::Result<Result<(), store::Error>> {
        let store = self.bucket(&bucket)?;
        let ttl = Duration::from_millis(ttl_ms.max(1));
        let result = store.set(&key, &value, Some(ttl), self.deadline).await;
        self.changed(store);
        Ok(result.map_err(error))
    }

    async fn increment(
        &mut self,
        bucket: Resource<Bucket>,
        key: String,
        delta: i64,
        window_ms: u64,
        limit: Option<i64>,
    ) -> wasmtime::Result<Result<expiring::Window, store::Error>> {
        let store = self.bucket(&bucket)?;
        let window_length = Duration::from_millis(window_ms);
        let result = store
            .window(&key, delta, window_length, limit, self.deadline)
            .await;
        // Past its limit, the counter is left as it was.
        if !result.as_ref().is_ok_and(|w| !w.applied) {
            self.changed(store);
        }
        Ok(result.map(window).map_err(error))
    }

    async fn get_or_claim(
        &mut self,
        bucket: Resource<Bucket>,
        key: String,
        claim: String,
        claim_ms: u64,
    ) -> wasmtime::Result<Result<expiring::Lookup, store::Error>> {
        let store = self.bucket(&bucket)?;
        let result = store
            .get_or_claim(&key, &claim, Duration::from_millis(claim_ms), self.deadline)
            .await;
        // Only a claim changes the store (a request waiting for another's
        // claim, looking again and again, may be cut at any time).
        if matches!(result, Ok(Lookup::Claimed) | Err(_)) {
            self.changed(store);
        }
        Ok(result
            .map(|lookup| match lookup {
                Lookup::Found(value) => expiring::Lookup::Found(value),
                Lookup::Claimed => expiring::Lookup::Claimed,
                Lookup::Busy => expiring::Lookup::Busy,
            })
            .map_err(error))
    }

    async fn increment_all(
        &mut self,
        bucket: Resource<Bucket>,
        counters: Vec<expiring::Counter>,
    ) -> wasmtime::Result<Result<Vec<expiring::Window>, store::Error>> {
        let store = self.bucket(&bucket)?;
        let counters: Vec<Counter> = counters
            .into_iter()
            .map(|c| Counter {
                key: c.key,
                delta: c.delta,
                window: Duration::from_millis(c.window_ms),
                limit: c.limit,
            })
            .collect();
        let result = store.windows(&counters, self.deadline).await;
        // All are applied or none is.
        if !result
            .as_ref()
            .is_ok_and(|windows| windows.iter().all(|w| !w.applied))
        {
            self.changed(store);
        }
        Ok(result
            .map(|windows| windows.into_iter().map(window).collect())
            .map_err(error))
    }
}

fn window(
    Window {
        value,
        applied,
        reset_ms,
    }: Window,
) -> expiring::Window {
    expiring::Window {
        value,
        applied,
        reset_ms,
    }
}
