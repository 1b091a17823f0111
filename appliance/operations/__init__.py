"""The operations the data plane runs (tensor, embed, generate): what each needs of a model, a cache entry and a
cloud upstream. The data plane alone decides the order of the steps; an operation does one step's work for its
kind of request."""
