//! Typed stage configuration: the `init` export's key/value pairs,
//! deserialized into the stage's own `serde` type.
//!
//! The host hands every value over as a string (numbers and booleans of the
//! TOML file are written out as text). This deserializer parses each one as
//! the field's type asks: `u32` from `"20"`, `bool` from `"true"`, an enum's
//! unit variant from its name, a `Vec<T>` from a comma-separated list
//! (`"darn, heck"`; empty items are skipped), an `Option<T>` as `Some`.
//!
//! Errors name the key: an unknown key (checked against the fields of the
//! stage's struct, with or without `#[serde(deny_unknown_fields)]`), a value
//! that does not parse, a missing required field. A stage whose `Config` is
//! `()` takes no keys at all.

use std::fmt;

use serde::de::{self, DeserializeOwned, DeserializeSeed, IntoDeserializer, MapAccess, Visitor};

/// A configuration the stage cannot accept; its text names the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    key: Option<String>,
    message: String,
}

impl ConfigError {
    /// An error about `key`.
    pub fn for_key(key: &str, message: impl fmt::Display) -> Self {
        ConfigError {
            key: Some(key.to_string()),
            message: message.to_string(),
        }
    }

    fn with_key(mut self, key: &str) -> Self {
        if self.key.is_none() {
            self.key = Some(key.to_string());
        }
        self
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.key {
            Some(key) => write!(f, "config key `{key}`: {}", self.message),
            None => write!(f, "config: {}", self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

impl de::Error for ConfigError {
    fn custom<T: fmt::Display>(message: T) -> Self {
        ConfigError {
            key: None,
            message: message.to_string(),
        }
    }
}

/// Deserialize a stage's configuration from the pairs `init` receives.
///
/// # Errors
///
/// A [`ConfigError`] naming the first key that is unknown or does not
/// parse, or the missing field.
pub fn from_pairs<T: DeserializeOwned>(pairs: Vec<(String, String)>) -> Result<T, ConfigError> {
    T::deserialize(Pairs(pairs))
}

/// The whole configuration: a map of keys to string values.
struct Pairs(Vec<(String, String)>);

impl<'de> de::Deserializer<'de> for Pairs {
    type Error = ConfigError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ConfigError> {
        visitor.visit_map(PairsAccess {
            pairs: self.0.into_iter(),
            value: None,
        })
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, ConfigError> {
        if let Some((key, _)) = self
            .0
            .iter()
            .find(|(key, _)| !fields.contains(&key.as_str()))
        {
            let known = fields
                .iter()
                .map(|f| format!("`{f}`"))
                .collect::<Vec<_>>()
                .join(", ");
            return Err(ConfigError::for_key(
                key,
                format!("unknown key; this stage takes {known}"),
            ));
        }
        self.deserialize_any(visitor)
    }

    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ConfigError> {
        match self.0.first() {
            Some((key, _)) => Err(ConfigError::for_key(
                key,
                "unknown key; this stage takes no configuration",
            )),
            None => visitor.visit_unit(),
        }
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, ConfigError> {
        self.deserialize_unit(visitor)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option newtype_struct seq tuple tuple_struct map enum
        identifier ignored_any
    }
}

struct PairsAccess {
    pairs: std::vec::IntoIter<(String, String)>,
    value: Option<(String, String)>,
}

impl<'de> MapAccess<'de> for PairsAccess {
    type Error = ConfigError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, ConfigError> {
        let Some((key, value)) = self.pairs.next() else {
            return Ok(None);
        };
        let name: de::value::StrDeserializer<'_, ConfigError> = key.as_str().into_deserializer();
        let parsed = seed.deserialize(name).map_err(|e| e.with_key(&key))?;
        self.value = Some((key, value));
        Ok(Some(parsed))
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, ConfigError> {
        let (key, text) = self
            .value
            .take()
            .ok_or_else(|| <ConfigError as de::Error>::custom("value requested before its key"))?;
        seed.deserialize(Value(text)).map_err(|e| e.with_key(&key))
    }
}

/// One value, as text.
struct Value(String);

impl Value {
    fn parse<T: std::str::FromStr>(&self, expected: &str) -> Result<T, ConfigError> {
        self.0.trim().parse().map_err(|_| {
            <ConfigError as de::Error>::custom(format!("expected {expected}, got {:?}", self.0))
        })
    }
}

macro_rules! parse_as {
    ($($method:ident => $visit:ident : $ty:ty, $expected:literal;)*) => {$(
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ConfigError> {
            visitor.$visit(self.parse::<$ty>($expected)?)
        }
    )*};
}

impl<'de> de::Deserializer<'de> for Value {
    type Error = ConfigError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ConfigError> {
        visitor.visit_string(self.0)
    }

    parse_as! {
        deserialize_bool => visit_bool: bool, "true or false";
        deserialize_i8 => visit_i8: i8, "a whole number";
        deserialize_i16 => visit_i16: i16, "a whole number";
        deserialize_i32 => visit_i32: i32, "a whole number";
        deserialize_i64 => visit_i64: i64, "a whole number";
        deserialize_i128 => visit_i128: i128, "a whole number";
        deserialize_u8 => visit_u8: u8, "a whole number from 0 to 255";
        deserialize_u16 => visit_u16: u16, "a whole number from 0 to 65535";
        deserialize_u32 => visit_u32: u32, "a non-negative whole number";
        deserialize_u64 => visit_u64: u64, "a non-negative whole number";
        deserialize_u128 => visit_u128: u128, "a non-negative whole number";
        deserialize_f32 => visit_f32: f32, "a number";
        deserialize_f64 => visit_f64: f64, "a number";
        deserialize_char => visit_char: char, "a single character";
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ConfigError> {
        visitor.visit_some(self)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, ConfigError> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ConfigError> {
        // A TOML list reaches the stage as JSON (lists of tables among
        // them); a plain string is split at commas.
        if self.0.trim_start().starts_with('[') {
            return self
                .json()?
                .deserialize_seq(visitor)
                .map_err(<ConfigError as de::Error>::custom);
        }
        let items: Vec<Value> = self
            .0
            .split(',')
            .map(str::trim)
            .filter(|item| !item.is_empty())
            .map(|item| Value(item.to_string()))
            .collect();
        visitor.visit_seq(de::value::SeqDeserializer::new(items.into_iter()))
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, ConfigError> {
        let name: de::value::StringDeserializer<ConfigError> =
            self.0.trim().to_string().into_deserializer();
        visitor.visit_enum(name)
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ConfigError> {
        visitor.visit_unit()
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ConfigError> {
        self.json()?
            .deserialize_map(visitor)
            .map_err(<ConfigError as de::Error>::custom)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, ConfigError> {
        self.json()?
            .deserialize_struct(name, fields, visitor)
            .map_err(<ConfigError as de::Error>::custom)
    }

    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ConfigError> {
        self.deserialize_string(visitor)
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ConfigError> {
        // A TOML list or table reaches the stage as its JSON: given to a
        // string setting, it is a mistake (a list of patterns where one
        // pattern per line is asked), not a string to use as it is.
        let text = self.0.trim_start();
        if (text.starts_with('[') || text.starts_with('{'))
            && serde_json::from_str::<serde_json::Value>(&self.0)
                .is_ok_and(|v| v.is_array() || v.is_object())
        {
            return Err(<ConfigError as de::Error>::custom(
                "expected a string, got a list or table",
            ));
        }
        visitor.visit_string(self.0)
    }

    serde::forward_to_deserialize_any! {
        bytes byte_buf unit unit_struct tuple tuple_struct identifier
    }
}

impl Value {
    /// The value as the JSON of a TOML list or table.
    fn json(self) -> Result<serde_json::Value, ConfigError> {
        serde_json::from_str(&self.0).map_err(<ConfigError as de::Error>::custom)
    }
}

impl<'de> IntoDeserializer<'de, ConfigError> for Value {
    type Deserializer = Value;

    fn into_deserializer(self) -> Value {
        self
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(default)]
    struct Filter {
        words: Vec<String>,
        mask: char,
        limit: u32,
        strict: bool,
        mode: Option<Mode>,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(rename_all = "snake_case")]
    enum Mode {
        Mask,
        Drop,
    }

    impl Default for Filter {
        fn default() -> Self {
            Filter {
                words: vec!["darn".into()],
                mask: '*',
                limit: 10,
                strict: false,
                mode: None,
            }
        }
    }

    fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
        items
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn values_parse_as_their_fields_types() {
        let filter: Filter = from_pairs(pairs(&[
            ("words", "heck, darn,,gosh "),
            ("mask", "#"),
            ("limit", "3"),
            ("strict", "true"),
            ("mode", "drop"),
        ]))
        .unwrap();
        assert_eq!(
            filter,
            Filter {
                words: vec!["heck".into(), "darn".into(), "gosh".into()],
                mask: '#',
                limit: 3,
                strict: true,
                mode: Some(Mode::Drop),
            }
        );
        assert_eq!(from_pairs::<Filter>(Vec::new()).unwrap(), Filter::default());
        let _ = Mode::Mask;
    }

    #[test]
    fn lists_and_tables_arrive_as_json_and_are_no_strings() {
        #[derive(Debug, serde::Deserialize)]
        struct Rule {
            name: String,
            limit: u64,
        }
        #[derive(Debug, serde::Deserialize)]
        struct Config {
            rules: Vec<Rule>,
            #[serde(default)]
            pattern: String,
        }
        let config: Config = from_pairs(pairs(&[
            ("rules", r#"[{"name":"a","limit":3}]"#),
            ("pattern", "[a-z]+"),
        ]))
        .unwrap();
        assert_eq!(
            (config.rules[0].name.as_str(), config.rules[0].limit),
            ("a", 3)
        );
        assert_eq!(config.pattern, "[a-z]+");
        let err = from_pairs::<Config>(pairs(&[("rules", "[]"), ("pattern", r#"["a","b"]"#)]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("pattern") && err.contains("list"), "{err}");
    }

    #[test]
    fn errors_name_the_key() {
        let err = from_pairs::<Filter>(pairs(&[("limit", "ten")])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "config key `limit`: expected a non-negative whole number, got \"ten\""
        );
        let err = from_pairs::<Filter>(pairs(&[("mode", "shout")])).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("config key `mode`: unknown variant `shout`"),
            "{err}"
        );
        let err = from_pairs::<Filter>(pairs(&[("limt", "3")])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "config key `limt`: unknown key; this stage takes `words`, `mask`, `limit`, `strict`, `mode`"
        );
        let err = from_pairs::<()>(pairs(&[("x", "1")])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "config key `x`: unknown key; this stage takes no configuration"
        );
        from_pairs::<()>(Vec::new()).unwrap();
    }

    #[test]
    fn a_missing_required_field_is_named() {
        #[derive(Debug, Deserialize)]
        #[allow(dead_code)]
        struct Needs {
            endpoint: String,
        }
        let err = from_pairs::<Needs>(Vec::new()).unwrap_err();
        assert_eq!(err.to_string(), "config: missing field `endpoint`");
    }
}
