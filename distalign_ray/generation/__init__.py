"""Generation engines behind one interface, and the Ray Data pipeline that runs them."""
