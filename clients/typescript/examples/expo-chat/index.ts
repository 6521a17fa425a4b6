import 'react-native-get-random-values'; // crypto.getRandomValues for the SDK: before anything else
import { registerRootComponent } from 'expo';

import App from './App';

registerRootComponent(App);
