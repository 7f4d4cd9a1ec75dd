//! Language models on top of the contract: model names, the tokenizer, and
//! `lockstep generate` / `replay-layer`.

pub mod distribute;
pub mod generate;
pub mod models;
pub mod tokenizer;
