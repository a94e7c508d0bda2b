//! A stage written the way a Spin component uses a store: through the
//! standard `wasi:keyvalue` imports only (`store.open`, `atomics.increment`),
//! with no SDK. Each request adds 1 to the counter `key` (config, default
//! `hits`) of the store `store` (config, default `counters`) and notes the
//! new value (`kv.count`), or the error (`kv.error`): the request is
//! answered either way. With `repeat` (config) it adds 1 that many times
//! (what `benches/stores.rs` times one operation with).
//!
//! Built against `orchestrator:pipeline@0.2.1` (a frozen copy of its WIT
//! and the `wasi:keyvalue` it vendors, `tests/plugins/wit-0.2.1`), the
//! version that added the stores: the host must keep loading it unchanged.
//! Do not update `../wit-0.2.1`; it is a snapshot.

wit_bindgen::generate!({ world: "request-stage", path: "../wit-0.2.1", generate_all });

use std::cell::RefCell;

use wasi::keyvalue::{atomics, store};

struct Component;

thread_local! {
    static CONFIG: RefCell<(String, String, u32)> =
        RefCell::new(("counters".into(), "hits".into(), 1));
}

fn describe(error: store::Error) -> String {
    match error {
        store::Error::NoSuchStore => "no-such-store".into(),
        store::Error::AccessDenied => "access-denied".into(),
        store::Error::Other(message) => format!("other: {message}"),
    }
}

impl Guest for Component {
    fn init(config: Vec<(String, String)>) -> Result<(), String> {
        CONFIG.with(|c| -> Result<(), String> {
            let mut c = c.borrow_mut();
            for (key, value) in config {
                match key.as_str() {
                    "store" => c.0 = value,
                    "key" => c.1 = value,
                    "repeat" => c.2 = value.parse().map_err(|_| "repeat: a number".to_string())?,
                    _ => {}
                }
            }
            Ok(())
        })
    }

    fn process(request: &Request) -> Result<(), StageError> {
        let (name, key, repeat) = CONFIG.with(|c| c.borrow().clone());
        let counted = store::open(&name).and_then(|bucket| {
            let mut value = 0;
            for _ in 0..repeat {
                value = atomics::increment(&bucket, &key, 1)?;
            }
            Ok(value)
        });
        match counted {
            Ok(value) => request.set_note("kv.count", &value.to_string()),
            Err(error) => request.set_note("kv.error", &describe(error)),
        }
        Ok(())
    }
}

export!(Component);
