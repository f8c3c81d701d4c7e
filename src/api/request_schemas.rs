//! The request bodies' JSON Schemas, exactly as the validator (`api::validate`) accepts them: every
//! enum, bound and required field, one schema per role and per content part, and the cross-field
//! rules as `if`/`then`. Written out rather than derived, because a derived schema says only what
//! serde can parse, which is far more than the server serves; the bounds come from the validator's
//! own constants. What JSON Schema cannot say (a prompt and `max_tokens` within the context, an
//! image behind each URL, `best_of` equal to `n`, token ids below the vocabulary size) is in the
//! descriptions, and schema-driven tests state it in their hooks (`tests/schemathesis/hooks.py`).

use serde_json::{json, Map, Value};

use super::validate::response_format::MAX_SCHEMA_NAME;
use super::validate::{
    FRACTION_BOUNDS, IMAGE_DETAILS, MAX_LOGIT_BIAS, MAX_N, MAX_PROMPTS, MAX_STOP_CHARS,
    MAX_STOP_SEQUENCES, MAX_TOP_LOGPROBS, REFUSED_CHAT_FIELDS, REFUSED_COMPLETION_FIELDS,
    REFUSED_GUIDED_FIELDS,
};

fn nullable(schema: Value) -> Value {
    json!({"oneOf": [{"type": "null"}, schema]})
}

fn integer(min: i64, max: i64) -> Value {
    json!({"type": "integer", "minimum": min, "maximum": max})
}

/// The fields both endpoints share.
fn generation_properties(chat: bool) -> Map<String, Value> {
    let stop = json!({"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARS});
    let mut p = Map::new();
    p.insert("model".into(), json!({"type": "string", "description": "The served model's name (`GET /v1/models`); any other is a 404."}));
    p.insert("stream".into(), json!({"type": "boolean"}));
    p.insert(
        "stream_options".into(),
        nullable(
            json!({"type": "object", "properties": {"include_usage": {"type": "boolean"}},
                        "description": "Only with `stream: true`."}),
        ),
    );
    p.insert("n".into(), nullable(integer(1, MAX_N.into())));
    p.insert("seed".into(), nullable(integer(i64::MIN, i64::MAX)));
    p.insert(
        "stop".into(),
        nullable(json!({"oneOf": [stop, {"type": "array", "items": stop, "maxItems": MAX_STOP_SEQUENCES}]})),
    );
    let budget = json!({"type": "integer", "minimum": 1, "maximum": u32::MAX,
        "description": "Prompt plus this must fit the context (`max_model_len` of `GET /v1/models`); left out, the rest of the context."});
    p.insert("max_tokens".into(), nullable(budget.clone()));
    p.insert("max_completion_tokens".into(), nullable(budget));
    for (name, (lo, hi)) in FRACTION_BOUNDS {
        let schema = if name == "top_p" {
            json!({"type": "number", "exclusiveMinimum": lo, "maximum": hi})
        } else {
            json!({"type": "number", "minimum": lo, "maximum": hi})
        };
        p.insert(name.into(), nullable(schema));
    }
    p.insert(
        "top_k".into(),
        nullable(
            json!({"type": "integer", "minimum": -1, "maximum": i32::MAX,
                        "description": "vLLM extension: -1 or 0 disables."}),
        ),
    );
    p.insert(
        "logit_bias".into(),
        nullable(json!({
            "type": "object",
            "propertyNames": {"pattern": "^(0|[1-9][0-9]{0,9})$"},
            "additionalProperties": {"type": "number", "minimum": -MAX_LOGIT_BIAS, "maximum": MAX_LOGIT_BIAS},
            "description": "Token id (decimal, below the vocabulary size) → bias."
        })),
    );
    let logprobs = if chat {
        json!({"type": "boolean"})
    } else {
        json!({"oneOf": [{"type": "boolean"}, integer(0, MAX_TOP_LOGPROBS.into())],
               "description": "The number of alternatives per token (legacy API); `true` is 0."})
    };
    p.insert("logprobs".into(), nullable(logprobs));
    p.insert(
        "top_logprobs".into(),
        nullable(integer(0, MAX_TOP_LOGPROBS.into())),
    );
    p.insert("ignore_eos".into(), nullable(json!({"type": "boolean"})));
    p.insert(
        "cache_salt".into(),
        nullable(json!({"type": "string", "minLength": 1,
            "description": "vLLM extension: prefix-cache entries are shared only within one salt."})),
    );
    p.insert("user".into(), nullable(json!({"type": "string"})));
    p.insert("response_format".into(), nullable(response_format()));
    p.insert("structured_outputs".into(), nullable(structured_outputs()));
    p.insert(
        "best_of".into(),
        nullable(json!({"type": "integer", "minimum": 1, "maximum": MAX_N,
                        "description": "Supported only equal to `n`."})),
    );
    p
}

/// `stream_options` needs `stream: true`; `top_logprobs` above 0 needs `logprobs`.
fn generation_rules(chat: bool) -> Value {
    let logprobs_on = if chat {
        json!({"const": true})
    } else {
        json!({"not": {"enum": [false, null]}})
    };
    json!([
        {"if": {"required": ["stream_options"], "properties": {"stream_options": {"type": "object"}}},
         "then": {"required": ["stream"], "properties": {"stream": {"const": true}}}},
        {"if": {"required": ["top_logprobs"], "properties": {"top_logprobs": {"type": "integer", "minimum": 1}}},
         "then": {"required": ["logprobs"], "properties": {"logprobs": logprobs_on}}},
        {"if": {"required": ["structured_outputs"], "properties": {"structured_outputs": {"type": "object"}}},
         "then": {"properties": {"response_format": nullable(format_of("text"))}}}
    ])
}

/// The output formats of structured outputs; `fields` are what a `json_schema` format holds (under
/// `json_schema` in chat's shape, beside `type` in the Responses API's).
fn json_schema_fields() -> Map<String, Value> {
    let mut f = Map::new();
    f.insert(
        "name".into(),
        json!({"type": "string", "pattern": format!("^[a-zA-Z0-9_-]{{1,{MAX_SCHEMA_NAME}}}$")}),
    );
    f.insert("description".into(), nullable(json!({"type": "string"})));
    f.insert("strict".into(), nullable(json!({"type": "boolean"})));
    f.insert(
        "schema".into(),
        json!({"type": "object", "description": "A JSON Schema the answer will be valid for (always enforced, strict or not); one that cannot be compiled into a grammar is a 400."}),
    );
    f
}

fn format_of(kind: &str) -> Value {
    json!({"type": "object", "required": ["type"], "properties": {"type": {"const": kind}}})
}

/// `response_format` of chat and completions.
fn response_format() -> Value {
    json!({"oneOf": [
        format_of("text"),
        format_of("json_object"),
        {"type": "object", "required": ["type", "json_schema"], "properties": {
            "type": {"const": "json_schema"},
            "json_schema": {"type": "object", "required": ["name", "schema"], "properties": json_schema_fields()}
        }}
    ], "description": "Structured outputs: free text, any JSON object, or JSON valid for a schema; the grammar is enforced at every token."})
}

/// vLLM's `structured_outputs`: exactly one format.
fn structured_outputs() -> Value {
    let set =
        |field: &str, schema: Value| json!({"required": [field], "properties": {field: schema}});
    json!({
        "type": "object",
        "additionalProperties": false,
        "properties": {
            "json": nullable(json!({"oneOf": [{"type": "object"}, {"type": "string", "description": "A schema's JSON text."}]})),
            "regex": nullable(json!({"type": "string"})),
            "choice": nullable(json!({"type": "array", "minItems": 1, "items": {"type": "string"}})),
            "grammar": nullable(json!({"type": "string", "description": "Lark syntax, as llguidance reads it."})),
            "json_object": nullable(json!({"type": "boolean"})),
            "disable_any_whitespace": nullable(json!({"type": "boolean", "description": "JSON is always written without free whitespace."})),
            "disable_fallback": nullable(json!({"type": "boolean", "description": "There is no fallback."}))
        },
        "oneOf": [
            set("json", json!({"oneOf": [{"type": "object"}, {"type": "string"}]})),
            set("regex", json!({"type": "string"})),
            set("choice", json!({"type": "array"})),
            set("grammar", json!({"type": "string"})),
            set("json_object", json!({"const": true}))
        ],
        "description": "vLLM's structured outputs: exactly one of `json`, `regex`, `choice`, `grammar`, `json_object`; not with `response_format`. One that cannot be compiled is a 400."
    })
}

/// `text.format` of the Responses API.
fn text_format() -> Value {
    let mut fields = json_schema_fields();
    fields.insert("type".into(), json!({"const": "json_schema"}));
    json!({"oneOf": [
        format_of("text"),
        format_of("json_object"),
        {"type": "object", "required": ["type", "name", "schema"], "properties": fields}
    ]})
}

fn unsupported(description: &str) -> Value {
    json!({"type": "null", "description": description})
}

fn text_part() -> Value {
    json!({"type": "object", "required": ["type", "text"],
           "properties": {"type": {"const": "text"}, "text": {"type": "string"}}})
}

fn image_part() -> Value {
    json!({"type": "object", "required": ["type", "image_url"],
    "properties": {
        "type": {"const": "image_url"},
        "image_url": {"type": "object", "required": ["url"], "properties": {
            "url": {"type": "string", "description": "A `data:image/...;base64,` URI or an http(s) URL of a PNG, JPEG, WebP or GIF."},
            "detail": nullable(json!({"enum": IMAGE_DETAILS}))
        }}
    }})
}

fn message(roles: &[&str], content: Value, content_required: bool) -> Value {
    let required: Vec<&str> = if content_required {
        vec!["role", "content"]
    } else {
        vec!["role"]
    };
    json!({"type": "object", "required": required, "properties": {
        "role": {"enum": roles},
        "content": content,
        "name": nullable(json!({"type": "string"}))
    }})
}

fn messages_schema() -> Value {
    let text_parts = json!({"type": "array", "items": text_part()});
    let user_parts = json!({"type": "array", "items": {"oneOf": [text_part(), image_part()]}});
    json!({
        "type": "array",
        "minItems": 1,
        "description": "Images only in user messages; each becomes the model's image features in the prompt.",
        "items": {"oneOf": [
            message(&["system", "developer"], json!({"oneOf": [{"type": "string"}, text_parts]}), true),
            message(&["user"], json!({"oneOf": [{"type": "string"}, user_parts]}), true),
            message(&["assistant"], nullable(json!({"oneOf": [{"type": "string"}, text_parts]})), false),
        ]}
    })
}

/// `POST /v1/chat/completions`.
pub fn chat_request() -> Value {
    let mut p = generation_properties(true);
    p.insert("messages".into(), messages_schema());
    for field in REFUSED_CHAT_FIELDS.iter().chain(&REFUSED_GUIDED_FIELDS) {
        p.insert(
            (*field).into(),
            unsupported("Not supported: any value but null is a 400."),
        );
    }
    p.insert(
        "tool_choice".into(),
        nullable(json!({"const": "none", "description": "Tools are not supported: only `none`."})),
    );
    json!({"type": "object", "required": ["model", "messages"], "properties": p,
           "allOf": generation_rules(true), "description": "`POST /v1/chat/completions`."})
}

/// `POST /v1/completions`.
pub fn completion_request() -> Value {
    let mut p = generation_properties(false);
    let ids = json!({"type": "array", "minItems": 1,
        "items": {"type": "integer", "minimum": 0, "maximum": u32::MAX, "description": "Below the vocabulary size."}});
    p.insert(
        "prompt".into(),
        json!({"oneOf": [
                {"type": "string"},
                ids,
                {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": MAX_PROMPTS},
                {"type": "array", "items": ids, "minItems": 1, "maxItems": MAX_PROMPTS}
               ],
               "description": "Text, token ids, or a list of either (no template, no images); each prompt gets `n` choices."}),
    );
    let budget = json!({"type": "integer", "minimum": 0, "maximum": u32::MAX,
        "description": "0 only with `echo` (the prompt alone, scored with `logprobs`). Prompt plus this must fit the context."});
    p.insert("max_tokens".into(), nullable(budget.clone()));
    p.insert("max_completion_tokens".into(), nullable(budget));
    p.insert("echo".into(), nullable(json!({"type": "boolean", "description": "The prompt's text first; with `logprobs`, its tokens scored too (the first one `null`)."})));
    for field in REFUSED_COMPLETION_FIELDS
        .iter()
        .chain(&REFUSED_GUIDED_FIELDS)
    {
        p.insert(
            (*field).into(),
            unsupported("Not supported: any value but null is a 400."),
        );
    }
    let mut rules = generation_rules(false);
    let zero = |field: &str| json!({"required": [field], "properties": {field: {"const": 0}}});
    let rules_list = rules.as_array_mut().expect("rules are a list");
    for field in ["max_tokens", "max_completion_tokens"] {
        rules_list.push(json!({"if": zero(field),
            "then": {"required": ["echo"], "properties": {"echo": {"const": true}}}}));
    }
    json!({"type": "object", "required": ["model", "prompt"], "properties": p,
           "allOf": rules, "description": "`POST /v1/completions`."})
}

/// `POST /tokenize`: a prompt, or messages (exactly one of them).
pub fn tokenize_request() -> Value {
    let model =
        json!({"type": "string", "description": "The served model's name; any other is a 404."});
    let flag = nullable(json!({"type": "boolean"}));
    json!({
        "type": "object",
        "description": "`POST /tokenize` (vLLM's shape): `prompt`, or chat `messages` with images.",
        "properties": {
            "model": nullable(model),
            "prompt": nullable(json!({"type": "string"})),
            "messages": nullable(messages_schema()),
            "add_special_tokens": flag,
            "add_generation_prompt": flag,
            "return_token_strs": flag
        },
        "oneOf": [
            {"required": ["prompt"], "properties": {
                "prompt": {"type": "string"},
                "messages": {"type": "null"},
                "add_generation_prompt": {"type": "null", "description": "Messages only."}}},
            {"required": ["messages"], "properties": {
                "messages": {"type": "array"},
                "prompt": {"type": "null"}}}
        ]
    })
}

/// `POST /detokenize`.
pub fn detokenize_request() -> Value {
    json!({
        "type": "object",
        "required": ["tokens"],
        "description": "`POST /detokenize` (vLLM's shape).",
        "properties": {
            "model": nullable(json!({"type": "string"})),
            "tokens": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": u32::MAX,
                       "description": "Below the vocabulary size."}}
        }
    })
}

/// `POST /v1/responses`: stateless, text and images in.
pub fn responses_request() -> Value {
    let input_text = json!({"type": "object", "required": ["type", "text"],
        "properties": {"type": {"const": "input_text"}, "text": {"type": "string"}}});
    let output_text = json!({"type": "object", "required": ["type", "text"],
        "properties": {"type": {"const": "output_text"}, "text": {"type": "string"}}});
    let input_image = json!({"type": "object", "required": ["type", "image_url"], "properties": {
        "type": {"const": "input_image"},
        "image_url": {"type": "string", "description": "A `data:` URI or an http(s) URL."},
        "detail": nullable(json!({"enum": IMAGE_DETAILS}))}});
    let item = |roles: &[&str], parts: Vec<Value>| {
        json!({"type": "object", "required": ["role", "content"], "properties": {
            "type": nullable(json!({"const": "message"})),
            "role": {"enum": roles},
            "content": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"oneOf": parts}}]}
        }})
    };
    let items = json!({"type": "array", "minItems": 1, "items": {"oneOf": [
        item(&["system", "developer"], vec![input_text.clone()]),
        item(&["user"], vec![input_text.clone(), input_image]),
        item(&["assistant"], vec![output_text, input_text]),
    ]}});
    let harmless = |schema: Value, description: &str| {
        let mut schema = nullable(schema);
        schema["description"] = json!(description);
        schema
    };
    let mut p = Map::new();
    p.insert(
        "model".into(),
        json!({"type": "string", "description": "The served model's name; any other is a 404."}),
    );
    p.insert(
        "input".into(),
        json!({"oneOf": [{"type": "string"}, items]}),
    );
    p.insert("instructions".into(), nullable(json!({"type": "string"})));
    p.insert(
        "max_output_tokens".into(),
        nullable(json!({"type": "integer", "minimum": 1, "maximum": u32::MAX})),
    );
    for (name, (lo, hi)) in FRACTION_BOUNDS {
        if name == "temperature" {
            p.insert(
                name.into(),
                nullable(json!({"type": "number", "minimum": lo, "maximum": hi})),
            );
        }
        if name == "top_p" {
            p.insert(
                name.into(),
                nullable(json!({"type": "number", "exclusiveMinimum": lo, "maximum": hi})),
            );
        }
    }
    p.insert("stream".into(), json!({"type": "boolean"}));
    p.insert("user".into(), nullable(json!({"type": "string"})));
    p.insert("metadata".into(), nullable(json!({"type": "object"})));
    p.insert(
        "store".into(),
        harmless(json!({"const": false}), "Nothing is stored: only false."),
    );
    p.insert(
        "background".into(),
        harmless(json!({"const": false}), "Only false."),
    );
    p.insert(
        "tools".into(),
        harmless(
            json!({"type": "array", "maxItems": 0}),
            "Tools are not supported.",
        ),
    );
    p.insert(
        "include".into(),
        harmless(json!({"type": "array", "maxItems": 0}), "Not supported."),
    );
    p.insert(
        "tool_choice".into(),
        harmless(json!({"enum": ["none", "auto"]}), "No tools to call."),
    );
    p.insert(
        "truncation".into(),
        harmless(json!({"const": "disabled"}), "Only disabled."),
    );
    p.insert(
        "top_logprobs".into(),
        harmless(json!({"const": 0}), "Not supported."),
    );
    p.insert(
        "text".into(),
        nullable(json!({"type": "object", "properties": {"format": nullable(text_format())}})),
    );
    for field in [
        "previous_response_id",
        "conversation",
        "prompt",
        "reasoning",
        "max_tool_calls",
        "prompt_cache_key",
    ] {
        p.insert(
            field.into(),
            unsupported("Not supported: any value but null is a 400."),
        );
    }
    json!({"type": "object", "required": ["model", "input"], "properties": p,
           "description": "`POST /v1/responses`, stateless."})
}
