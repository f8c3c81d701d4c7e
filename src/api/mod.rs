//! The HTTP face of the server (axum, utoipa, OpenAI wire types). Arrives with the API issue; the
//! only home of HTTP and JSON wire shapes.
