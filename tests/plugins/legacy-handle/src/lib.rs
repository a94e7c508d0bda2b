//! A stage built against the 0.1.2 contract's handle world
//! (`request-stage` of `wit/v0.1`), as stages were before 0.2.0: it sees
//! the chat as role and text, upper-cases the text of the last user
//! message through `set-messages`, and notes how many messages it saw
//! (`shout.messages`). The host must keep the rest of the chat as the
//! client sent it.

wit_bindgen::generate!({ world: "request-stage", path: "../../../wit/v0.1" });

struct Component;

impl Guest for Component {
    fn init(_config: Vec<(String, String)>) -> Result<(), String> {
        Ok(())
    }

    fn process(request: &Request) -> Result<(), StageError> {
        let mut messages = request.messages();
        request.set_note("shout.messages", &messages.len().to_string());
        if let Some(last) = messages.iter_mut().rev().find(|m| m.role == "user") {
            last.content = last.content.to_uppercase();
        }
        request.set_messages(&messages);
        Ok(())
    }
}

export!(Component);
