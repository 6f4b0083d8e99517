[inputs: ["{mix,.formatter}.exs", "{lib,test}/**/*.{ex,exs}", "demo.exs"], line_length: 110]
