//! A stage built against `orchestrator:pipeline@0.2.0` (a frozen copy of
//! its WIT, `tests/plugins/wit-0.2.0`), before stores and identity were
//! added: the host must keep loading it unchanged. It notes how many
//! messages it saw (`v020.messages`).

wit_bindgen::generate!({ world: "request-stage", path: "../wit-0.2.0" });

struct Component;

impl Guest for Component {
    fn init(_config: Vec<(String, String)>) -> Result<(), String> {
        Ok(())
    }

    fn process(request: &Request) -> Result<(), StageError> {
        let messages = request.messages();
        request.set_note("v020.messages", &messages.len().to_string());
        Ok(())
    }
}

export!(Component);
