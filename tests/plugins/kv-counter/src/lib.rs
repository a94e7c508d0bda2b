//! A stage written the way a Spin component uses a store: through the
//! standard `wasi:keyvalue` imports only (`store.open`, `atomics.increment`),
//! with no SDK. Each request adds 1 to the counter `key` (config, default
//! `hits`) of the store `store` (config, default `counters`) and notes the
//! new value (`kv.count`), or the error (`kv.error`): the request is
//! answered either way.

wit_bindgen::generate!({ world: "request-stage", path: "../../../wit", generate_all });

use std::cell::RefCell;

use wasi::keyvalue::{atomics, store};

struct Component;

thread_local! {
    static CONFIG: RefCell<(String, String)> = RefCell::new(("counters".into(), "hits".into()));
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
        CONFIG.with(|c| {
            let mut c = c.borrow_mut();
            for (key, value) in config {
                match key.as_str() {
                    "store" => c.0 = value,
                    "key" => c.1 = value,
                    _ => {}
                }
            }
        });
        Ok(())
    }

    fn process(request: &Request) -> Result<(), StageError> {
        let (name, key) = CONFIG.with(|c| c.borrow().clone());
        let counted = store::open(&name).and_then(|bucket| atomics::increment(&bucket, &key, 1));
        match counted {
            Ok(value) => request.set_note("kv.count", &value.to_string()),
            Err(error) => request.set_note("kv.error", &describe(error)),
        }
        Ok(())
    }
}

export!(Component);
