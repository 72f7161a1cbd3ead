"""Built-in recipes, by the name used on the command line (`recipe=<name>`)."""

BUILTIN = {
    "gpt": "recipes.gpt:GPTRecipe",
    "digits": "recipes.digits:DigitsRecipe",
}
