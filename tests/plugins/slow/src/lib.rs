//! A stage that passes the envelope through after sleeping `delay_ms`
//! (default 300) — long enough to fill queues and to outlive deadlines.

use std::sync::atomic::{AtomicU64, Ordering};

// The by-value `stage` world of 0.1.2 (`wit/v0.1`): an old plugin, which
// the host must keep loading.
wit_bindgen::generate!({ world: "stage", path: "../../../wit/v0.1" });

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
