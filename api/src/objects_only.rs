//! Deserializers that take a nested struct only from a JSON object: serde's derive also accepts an
//! array of the fields in order (`"resource": [null, null]`), which the schema does not allow and
//! which no client means.

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use std::fmt;
use std::marker::PhantomData;

/// A `T` read from a JSON object only.
struct Object<T>(T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ObjectVisitor<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for ObjectVisitor<T> {
            type Value = Object<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                T::deserialize(serde::de::value::MapAccessDeserializer::new(map)).map(Object)
            }
        }
        deserializer.deserialize_map(ObjectVisitor(PhantomData))
    }
}

/// For a struct field: `#[serde(deserialize_with = "crate::objects_only::one")]`.
pub fn one<'de, D: Deserializer<'de>, T: Deserialize<'de>>(deserializer: D) -> Result<T, D::Error> {
    Object::deserialize(deserializer).map(|o| o.0)
}

/// For an optional struct field (null or absent is `None`).
pub fn optional<'de, D: Deserializer<'de>, T: Deserialize<'de>>(deserializer: D) -> Result<Option<T>, D::Error> {
    Option::<Object<T>>::deserialize(deserializer).map(|o| o.map(|o| o.0))
}

/// For a list of structs.
pub fn list<'de, D: Deserializer<'de>, T: Deserialize<'de>>(deserializer: D) -> Result<Vec<T>, D::Error> {
    Vec::<Object<T>>::deserialize(deserializer).map(|items| items.into_iter().map(|o| o.0).collect())
}

#[cfg(test)]
mod tests {
    use crate::sandbox::SandboxCreateRequest;

    fn parse(body: &str) -> Result<SandboxCreateRequest, serde_json::Error> {
        serde_json::from_str(body)
    }

    #[test]
    fn nested_structs_are_read_from_objects_only() {
        let ok = r#"{"id":"a","spec":{"containers":[{"name":"c","image":"x","resource":{"cpu":"1"},"env":[{"name":"A"}]}],
                     "ports":[{"container_port":80}],"readiness_probe":{"protocol":"tcp","port":80}}}"#;
        let parsed = parse(ok).expect("objects parse");
        assert_eq!(parsed.spec.containers[0].resource.as_ref().unwrap().cpu.as_deref(), Some("1"));
        assert!(parse(r#"{"id":"a","spec":{"containers":[{"name":"c","image":"x","resource":null}]}}"#).is_ok());
        for array_form in [
            r#"{"id":"a","spec":{"containers":[{"name":"c","image":"x","resource":[null,null,null]}]}}"#,
            r#"{"id":"a","spec":{"containers":[["c","x"]]}}"#,
            r#"{"id":"a","spec":{"containers":[{"name":"c","image":"x","env":[["A","1"]]}]}}"#,
            r#"{"id":"a","spec":{"ports":[[80,"tcp",null]],"containers":[]}}"#,
            r#"{"id":"a","spec":{"readiness_probe":["tcp",80],"containers":[]}}"#,
            r#"{"id":"a","spec":[false,null,[],null,[],{}]}"#,
        ] {
            let err = parse(array_form).expect_err(array_form).to_string();
            assert!(err.contains("expected an object") || err.contains("expected a map"), "{array_form}: {err}");
        }
    }
}
