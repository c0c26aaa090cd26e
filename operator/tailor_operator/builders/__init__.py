"""Pure builders: models -> plain dicts (child objects, trainer config, patches). No API calls."""
