// The library target exists so backlog-user can name this crate as a
// build-dependency (cargo then rebuilds the loader when the programs change).
#![no_std]
