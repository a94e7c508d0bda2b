//! A stage that wants the network: it imports wasi:sockets (through
//! `std::net`), which no stage is ever granted.

wit_bindgen::generate!({ world: "stage", path: "../../../wit" });

struct Component;

impl Guest for Component {
    fn init(_config: Vec<(String, String)>) -> Result<(), String> {
        Ok(())
    }

    fn process(mut request: Envelope) -> Result<Envelope, StageError> {
        match std::net::TcpStream::connect("127.0.0.1:9") {
            Ok(_) => request.completion = "connected".into(),
            Err(e) => request.completion = format!("no network: {e}"),
        }
        Ok(request)
    }
}

export!(Component);
