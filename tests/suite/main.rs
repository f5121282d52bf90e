mod attention;
mod backward;
mod cli;
mod common;
mod kernels;
mod masks;
mod paths;
mod tiers;
