"""What keras_ewc does with TensorFlow itself: the penalty's closed-form gradient and
the one-graph-call commit (`penalty`), `tf.distribute` (`distribute`) and SavedModel
export (`saved_model`). Imported only when TensorFlow is the Keras backend."""
