mod attention;
mod common;
mod masks;
