//! A stage that wants the network: it imports wasi:sockets (through
//! `std::net`) and connects to its config's `addr` in every call. The host
//! links sockets but denies every socket call, so the completion always
//! reads `no network: ...`.

use std::sync::OnceLock;

// The by-value `stage` world of 0.1.2 (`wit/v0.1`): an old plugin, which
// the host must keep loading.
wit_bindgen::generate!({ world: "stage", path: "../../../wit/v0.1" });

static ADDR: OnceLock<String> = OnceLock::new();

struct Component;

impl Guest for Component {
    fn init(config: Vec<(String, String)>) -> Result<(), String> {
        let addr = config
            .into_iter()
            .find(|(k, _)| k == "addr")
            .map_or_else(|| "127.0.0.1:9".to_string(), |(_, v)| v);
        let _ = ADDR.set(addr);
        Ok(())
    }

    fn process(mut request: Envelope) -> Result<Envelope, StageError> {
        let addr = ADDR.get().map_or("127.0.0.1:9", String::as_str);
        match std::net::TcpStream::connect(addr) {
            Ok(_) => request.completion = format!("connected to {addr}"),
            Err(e) => request.completion = format!("no network: {e}"),
        }
        Ok(request)
    }
}

export!(Component);
