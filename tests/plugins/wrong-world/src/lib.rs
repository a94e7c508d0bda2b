//! A valid component of another world: it exports `run`, not `process`.

wit_bindgen::generate!({
    inline: "package test:other; world other { export run: func() -> string; }",
});

struct Component;

impl Guest for Component {
    fn run() -> String {
        "I am not a stage".into()
    }
}

export!(Component);
