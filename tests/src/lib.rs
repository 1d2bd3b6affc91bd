//! Integration-test harness: network namespaces, workloads, kernel counters.
