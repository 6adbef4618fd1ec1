//! The control plane: the Wake, Query, Kill, Sleep and CA handlers behind the Lambda
//! functions, as plain functions over typed requests, responses and the AWS clients.
