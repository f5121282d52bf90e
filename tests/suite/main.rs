mod attention;
mod cli;
mod common;
mod masks;
mod paths;
mod tiers;
