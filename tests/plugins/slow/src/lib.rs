//! A stage that passes the envelope through after sleeping `delay_ms`
//! (default 300) — long enough to fill queues and to outlive deadlines.

use std::sync::atomic::{AtomicU64, Ordering};

wit_bindgen::generate!({ world: "stage", path: "../../../wit" });

static DELAY_MS: AtomicU64 = AtomicU64::new(300);

struct Component;

impl Guest for Component {
    fn init(config: Vec<(String, String)>) -> Result<(), String> {
        for (key, value) in config {
            if key == "delay_ms" {
                DELAY_MS.store(
                    value
                        .parse()
                        .map_err(|_| "delay_ms: not a number".to_string())?,
                    Ordering::Relaxed,
                );
            }
        }
        Ok(())
    }

    fn process(request: Envelope) -> Result<Envelope, StageError> {
        std::thread::sleep(std::time::Duration::from_millis(
            DELAY_MS.load(Ordering::Relaxed),
        ));
        Ok(request)
    }
}

export!(Component);
