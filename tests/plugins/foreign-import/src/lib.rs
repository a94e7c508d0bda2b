//! A stage that imports an interface of a package the host does not
//! provide (`test:foreign/telemetry`): refused at load, before compiling,
//! with the import named.

wit_bindgen::generate!({
    inline: "
        package test:foreign;
        interface telemetry { send: func(data: string); }
        world foreign {
            import telemetry;
            export init: func(config: list<tuple<string, string>>) -> result<_, string>;
            export process: func(request: string) -> string;
        }
    ",
});

struct Component;

impl Guest for Component {
    fn init(_config: Vec<(String, String)>) -> Result<(), String> {
        Ok(())
    }

    fn process(request: String) -> String {
        test::foreign::telemetry::send(&request);
        request
    }
}

export!(Component);
