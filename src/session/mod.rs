//! Sessions: one kernel + its ordered execution queue, subscribers and lifecycle.
