pub mod demo;
pub mod distill;
pub mod features;
pub mod kmeans;
pub mod mvq;
pub mod prepare;
pub mod pretrain;
pub mod probe;
