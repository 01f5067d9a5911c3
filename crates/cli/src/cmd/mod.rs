pub mod demo;
pub mod features;
pub mod kmeans;
pub mod prepare;
