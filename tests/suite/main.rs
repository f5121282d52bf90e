mod attention;
mod common;
mod masks;
mod paths;
